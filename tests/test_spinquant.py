"""SpinQuant: the learning hooks compute the folded rotated model, the Cayley step stays on the orthogonal
group and descends, learning lowers the quantized calibration loss of QuaRot's rotation, and the CLI run
keeps the float model and saves a fake-quant model that reloads with its online rotations."""
import copy
import json

import pytest
import torch

from llmc.algorithms.quarot import rotate_model
from llmc.algorithms.spinquant import RotationHooks, SpinQuant, SpinQuantOptions, cayley_step, polar
from llmc.cli import main
from llmc.engine.context import RunContext
from llmc.export.save import ROTATIONS, load_fake_quant
from llmc.models.adapter import adapter_class, get_module, set_module
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.hadamard import random_hadamard, random_orthogonal
from llmc.quant.quantizer import QuantArgs
from test_quarot import _ids, _logits, _outlier_model, _rel

A4 = QuantArgs(bit=4, symmetric=False, granularity="per_token")
W4 = QuantArgs(bit=4, symmetric=False, granularity="per_channel")


def _folded(online=True, seed=0):
    """The outlier model with its norms folded and online Hadamards applied, ready to rotate."""
    model = _outlier_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1, 0.2)
    adapter = adapter_class(model.config.model_type, None)(model)
    algo = SpinQuant(None, A4, SpinQuantOptions(online_rotate=online))
    hidden = algo.fold_norms(model, adapter, RunContext(seed=seed))
    if online:
        for i, block in enumerate(adapter.block_list()):
            algo.online_rotations(block, i)
    return model, adapter, algo, hidden


def _hooked_loss(model, adapter, r, ids):
    hooks = RotationHooks(model, adapter, r.float(), A4)
    try:
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()
    finally:
        hooks.remove()


def test_hooks_compute_the_folded_rotated_model_with_quantized_inputs():
    """Hooked forward with R on unrotated weights == R folded into the weights (float64, as after learning)
    with every quantized linear's input fake-quantized by a QuantLinear."""
    model, adapter, _, hidden = _folded()
    r = random_orthogonal(hidden, torch.Generator().manual_seed(5))
    ids = _ids(n=2, length=24)
    hooks = RotationHooks(model, adapter, r.float(), A4)
    with torch.no_grad():
        hooked = _logits(model, ids)
    hooks.remove()
    folded = copy.deepcopy(model)
    rotate_model(folded, adapter_class("llama", None)(folded), RunContext(), r)
    for i in range(len(adapter.block_list())):
        for name in adapter.block_linear_names(i):
            full = f"{adapter.block_name(i)}.{name}"
            set_module(folded, full, QuantLinear(get_module(folded, full), None, A4))
    assert _rel(_logits(folded, ids), hooked) < 2e-3  # a few per-token roundings may fall the other way
    float_logits = _logits(model, ids)  # hooks removed: the unrotated float model again
    assert _rel(float_logits, hooked) > 1e-2  # 4-bit activations do change the output


def test_cayley_step_stays_orthogonal_and_descends():
    """Minimising ‖R − T‖² over orthogonal R (gradient 2(R − T)) from another orthogonal matrix."""
    gen = torch.Generator().manual_seed(0)
    target, r = random_orthogonal(24, gen), random_orthogonal(24, gen)
    start = (r - target).norm().item()
    for _ in range(200):
        r, _ = cayley_step(r, 2 * (r - target), 0.5)
    assert torch.allclose(r.T @ r, torch.eye(24, dtype=r.dtype), atol=1e-10)
    assert (r - target).norm().item() < 0.5 * start
    near = r + 1e-3 * torch.randn(24, 24, generator=gen, dtype=r.dtype)
    assert torch.allclose(polar(near).T @ polar(near), torch.eye(24, dtype=torch.float64), atol=1e-12)


def test_learning_lowers_the_quantized_calibration_loss_of_quarots_rotation():
    model, adapter, algo, hidden = _folded()
    ids = _ids(seed=3, n=16, length=32)
    r0 = random_hadamard(hidden, torch.Generator().manual_seed(0))
    algo.options = SpinQuantOptions(online_rotate=True, iters=8, batch_size=16, lr=1.5)  # full batch: large steps
    before = _hooked_loss(model, adapter, r0, ids)
    r = algo.learn(model, adapter, RunContext(), list(ids), r0, torch.Generator().manual_seed(0))
    assert torch.allclose(r.T @ r, torch.eye(hidden, dtype=torch.float64), atol=1e-10)
    assert _hooked_loss(model, adapter, r, ids) < before - 1e-3
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def _spin_config(make_config, wiki_files, tmp_path, **special):
    a4 = {"bit": 4, "symmetric": False, "granularity": "per_token"}
    w4 = {"bit": 4, "symmetric": False, "granularity": "per_channel", "group_size": -1}
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2,
             "preproc": "wikitext2_gptq"}
    return make_config({"calib": calib, "quant": {"method": "SpinQuant", "weight": w4, "act": a4,
                                                  "special": {"online_rotate": True, "iters": 4, **special}},
                        "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant"]},
                        "save": {"save_fake": True, "save_path": str(tmp_path / "out")}})


def test_cli_keeps_the_float_model_and_saves_its_rotations(make_config, wiki_files, tmp_path):
    assert main(["--config", _spin_config(make_config, wiki_files, tmp_path)]) == 0
    ppl = {e["pos"]: e["ppl"] for e in json.loads((tmp_path / "out" / "results.json").read_text())["evals"]}
    assert ppl["transformed"] == pytest.approx(ppl["pretrain"], rel=1e-4)
    assert ppl["fake_quant"] != pytest.approx(ppl["pretrain"], rel=1e-3)
    assert (tmp_path / "out" / "fake_quant_model" / ROTATIONS).is_file()
    loaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert loaded.model.layers[0].mlp.down_proj.online_rotation is not None


@pytest.mark.parametrize("changes,key", [
    ({"quant": {"act": None}}, "quant.act"),
    ({"quant": {"special": {"iters": 0}}}, "iters"),
])
def test_bad_spinquant_configs_are_refused(make_config, wiki_files, tmp_path, capsys, changes, key):
    import yaml

    path = _spin_config(make_config, wiki_files, tmp_path)
    cfg = yaml.safe_load(open(path))
    for section, values in changes.items():
        for k, v in values.items():
            if v is None:
                cfg[section].pop(k)
            elif isinstance(v, dict):
                cfg[section][k].update(v)
    open(path, "w").write(yaml.safe_dump(cfg))
    assert main(["--config", path]) == 2
    assert key in capsys.readouterr().err
