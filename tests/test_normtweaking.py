"""Norm Tweaking: its losses against written-out formulas; on a tiny model the block's output error falls
after tweaking, and only the norms change; the LLMC-style config and refusals."""
import copy

import pytest
import torch

from llmc.algorithms.normtweaking import NormTweaking, NormTweakingOptions, dist_loss, mse_loss
from llmc.cli import main
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs
from tiny import make_model

W3 = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32)


def test_losses_equal_their_formulas():
    torch.manual_seed(0)
    out, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4) * 2 + 1
    o, t = out.double().reshape(10, 4), target.double().reshape(10, 4)
    assert torch.isclose(mse_loss(out, target).double(), ((o - t) ** 2).sum() / 40)
    expect = 0.0
    for c in range(4):  # per channel: |mean difference| + |population std difference|, averaged over channels
        mq, mf = o[:, c].sum() / 10, t[:, c].sum() / 10
        sq, sf = ((o[:, c] - mq) ** 2).sum().div(10).sqrt(), ((t[:, c] - mf) ** 2).sum().div(10).sqrt()
        expect += (abs(mf - mq) + abs(sf - sq)) / 4
    assert torch.isclose(dist_loss(out, target).double(), expect, atol=1e-6)


def _batches(model, n=4, seed=3, length=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (2, length), generator=g) for _ in range(n)]


def _block0_error(model, base, batches) -> float:
    errs = []
    for ids in batches:
        with torch.no_grad():
            h = base.model.embed_tokens(ids)
            rope = base.model.rotary_emb(h, torch.arange(ids.shape[1]).unsqueeze(0))
            ref, out = (base.model.layers[0](h, position_embeddings=rope), model.model.layers[0](h, position_embeddings=rope))
        ref, out = (t[0] if isinstance(t, tuple) else t for t in (ref, out))
        errs.append((out - ref).pow(2).mean().item())
    return sum(errs) / len(errs)


@pytest.mark.parametrize("loss, method", [("mse", "RTN"), ("dist", "RTN"), ("mse", "GPTQ")])
def test_tweaking_lowers_block_error_and_changes_only_norms(loss, method):
    base = make_model("llama")
    calib = _batches(base, 2, seed=1)
    models = {}
    for epochs in (0, 8):
        model = copy.deepcopy(base)
        opts = NormTweakingOptions(epochs=epochs, ntweak_lr=3e-3, loss=loss, weight_method=method)
        quantize_blocks(model, adapter_class("llama", None)(model), NormTweaking(W3, None, opts), calib, set(),
                        RunContext(), quant_out=True)
        models[epochs] = model
    assert _block0_error(models[8], base, calib) < 0.9 * _block0_error(models[0], base, calib)
    tweaked, plain = dict(models[8].named_parameters()), dict(models[0].named_parameters())
    changed = {n for n in tweaked if not torch.equal(tweaked[n], plain[n])}
    # block 0 sees the same inputs in both runs; later blocks' GPTQ sees the tweaked stream (quant_out)
    same_inputs = changed if method == "RTN" else {n for n in changed if n.startswith("model.layers.0.")}
    assert same_inputs and all("norm" in n for n in same_inputs), changed
    assert {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"} <= changed
    assert "model.norm.weight" not in changed and "model.embed_tokens.weight" not in changed  # outside blocks
    for name, q in models[8].model.layers[0].named_modules():  # the grid is the untweaked one, fixed
        if isinstance(q, QuantLinear):
            ref = models[0].model.layers[0].get_submodule(name)
            assert torch.equal(q.fake_weight(), ref.fake_weight())


def _config(make_config, wiki_files, tmp_path, special):
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 32, "bs": 4}
    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
    return make_config({"calib": calib, "quant": {"method": "NormTweaking", "weight": weight, "special": special,
                                                  "quant_out": True},
                        "save": {"save_path": str(tmp_path / "out")}})


def test_llmc_style_config_runs(make_config, wiki_files, tmp_path):
    special = {"ntweak_lr": 1e-6, "deactive_amp": False, "epochs": 2, "gamma": 0.001}
    assert main(["--config", _config(make_config, wiki_files, tmp_path, special)]) == 0


@pytest.mark.parametrize("special, words", [
    ({"gptq": {"percdamp": 0.1}}, ["quant.special.gptq", "weight_method"]),
    ({"weight_method": "GPTQ", "gptq": {"percdamp": 2}}, ["quant.special.percdamp"]),
    ({"loss": "kl"}, ["quant.special.loss"]),
    ({"epochs": -1}, ["quant.special.epochs"]),
])
def test_refusals_before_loading(make_config, wiki_files, tmp_path, capsys, special, words):
    assert main(["--config", _config(make_config, wiki_files, tmp_path, special)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
