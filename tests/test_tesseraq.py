"""TesseraQ: the rectified sigmoid and the hardening step against the paper's formulas written out, weights left
on their grid one rounding step at most from round-to-nearest, a lower block error than RTN, the AWQ → TesseraQ
hand-off (in memory and through files), LLMC's config keys, and refusals."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from llmc.algorithms.base import Options
from llmc.algorithms.rtn import RTN
from llmc.algorithms.tesseraq import (SoftRounding, TesseraQ, TesseraQOptions, rectified_sigmoid,
                                      rectified_sigmoid_inverse)
from llmc.cli import main
from llmc.engine.block import BlockJob
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import quant_linears
from llmc.quant.quantizer import QuantArgs, calibrate, grouped
from tiny import make_model

W3 = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)


def test_rectified_sigmoid_is_the_stretched_clipped_sigmoid():
    x = torch.linspace(-12, 12, 241)
    ref = torch.clamp(1 / (1 + torch.exp(-x)) * 1.2 - 0.1, 0, 1)
    assert torch.allclose(rectified_sigmoid(x), ref, atol=1e-7)
    assert rectified_sigmoid(torch.tensor(0.0)) == 0.5
    assert rectified_sigmoid(torch.tensor(float("inf"))) == 1 and rectified_sigmoid(torch.tensor(-float("inf"))) == 0
    y = torch.linspace(0, 0.999, 100)
    assert torch.allclose(rectified_sigmoid(rectified_sigmoid_inverse(y)), y, atol=1e-6)


def test_soft_rounding_starts_at_the_float_weight():
    """AdaRound's start, h = frac(w/s): floor(w/s) + h = w/s, so the soft weight is the float weight (where
    the grid reaches: the integer zero point may leave a row's end just outside it)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    scale, zero = calibrate(grouped(w, W3), W3)
    r = SoftRounding(w, scale, zero, W3, optimize_scale=True)
    inside = ((grouped(w, W3) / scale + zero >= -4) & (grouped(w, W3) / scale + zero <= 3)).reshape(w.shape)
    assert inside.float().mean() > 0.9
    assert torch.allclose(r.fake_quant(w)[inside], w[inside], atol=1e-5)


def _independent_hardening(alpha: torch.Tensor, q: float):
    """Which variables are hard after one step at quantile q, and to which side: scores |h - 0.5| with h the
    rectified sigmoid; the q-quantile by linear interpolation between sorted scores; above it, h > 0.5 rounds
    up (alpha = +inf), h < 0.5 down (-inf)."""
    h = torch.clamp(torch.sigmoid(alpha.double()) * 1.2 - 0.1, 0, 1)
    s = (h - 0.5).abs().flatten().sort().values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    value = s[lo] + (s[min(lo + 1, s.numel() - 1)] - s[lo]) * (pos - lo)
    return (h - 0.5 > value) & (h > 0.5), (0.5 - h > value) & (h < 0.5)


def test_hardening_fixes_the_most_confident_variables_to_their_side():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    scale, zero = calibrate(grouped(w, W3), W3)
    r = SoftRounding(w, scale, zero, W3, optimize_scale=False)
    with torch.no_grad():
        r.alpha.copy_(torch.randn(r.alpha.shape, generator=g))  # mostly unsaturated: distinct scores
    for q in (0.75, 0.5, 0.125):
        before = r.alpha.detach().clone()
        up, down = _independent_hardening(before, q)
        r.harden(q)
        assert torch.equal(r.alpha == float("inf"), up | (before == float("inf")))
        assert torch.equal(r.alpha == -float("inf"), down | (before == -float("inf")))
        soft = torch.isfinite(r.alpha)
        assert torch.equal(r.alpha[soft], before[soft])  # the rest is left to train
        assert soft.float().mean().item() == pytest.approx(q, abs=2 / r.alpha.numel())
    codes = r.codes()  # hard up is floor + 1, hard down floor
    assert torch.equal(codes[r.alpha == float("inf")], (r.base + 1).clamp(-4, 3)[r.alpha == float("inf")])
    assert torch.equal(codes[r.alpha == -float("inf")], r.base.clamp(-4, 3)[r.alpha == -float("inf")])


def _batches(model, n, bs, seed=3, length=24):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, model.config.vocab_size, (n * bs, length), generator=g).split(bs))


TRAIN = dict(iterations=15, lr=1e-2, batch_size=4, thresholds=[0.75, 0.5, 0.25, 0.1])


def test_weights_end_on_their_grid_one_step_at_most_from_round_to_nearest():
    model, ref = make_model("llama"), make_model("llama")
    originals = {n: m.weight.detach().clone() for n, m in ref.named_modules() if n.endswith("proj")}
    algo = TesseraQ(W3, None, TesseraQOptions(optimize_scale=False, **TRAIN))
    quantize_blocks(model, adapter_class("llama", None)(model), algo, _batches(model, 4, 2), set(), RunContext(),
                    quant_out=True)
    flips = 0
    for name, q in quant_linears(model):
        assert q.lwc is None and not q.weight.requires_grad
        assert torch.equal(q.dequantized(), q.weight), name  # fake-quant is the weight itself
        codes = q.int_weight()
        assert codes.min() >= -4 and codes.max() <= 3
        t = grouped(originals[name], W3) / q.w_scale  # the grid was fixed from the original weight
        nearest = torch.clamp(torch.round(t) + q.w_zero, -4, 3)
        down, up = torch.clamp(torch.floor(t) + q.w_zero, -4, 3), torch.clamp(torch.floor(t) + 1 + q.w_zero, -4, 3)
        assert torch.all((codes == down) | (codes == up)), name  # rounded up or down, nothing else
        assert (codes - nearest).abs().max() <= 1
        flips += (codes != nearest).sum().item()
    assert flips > 0


def test_learned_scale_factors_still_leave_an_ordinary_grid():
    model = make_model("llama")
    algo = TesseraQ(W3, None, TesseraQOptions(optimize_scale=True, scale_lr=1e-2, **TRAIN))
    quantize_blocks(model, adapter_class("llama", None)(model), algo, _batches(model, 4, 2), set(), RunContext(),
                    quant_out=True)
    for name, q in quant_linears(model):
        assert torch.equal(q.dequantized(), q.weight), name
        assert q.int_weight().min() >= -4 and q.int_weight().max() <= 3


def _block0_error(algo):
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    ctx = RunContext()
    inputs = capture_block_inputs(model, adapter, _batches(model, 4, 2), ctx)
    job = BlockJob(0, "model.layers.0", adapter.block_list()[0], adapter.subsets, inputs, set(), ctx)
    targets = job.forward()
    algo.apply(job, targets)
    return sum((o - t).pow(2).sum().item() for o, t in zip(job.forward(), targets))


def test_block_error_is_below_round_to_nearest_and_zero_iterations_is_rtn():
    rtn = _block0_error(RTN(W3, None, Options()))
    untrained = _block0_error(TesseraQ(W3, None, TesseraQOptions(iterations=0)))
    trained = _block0_error(TesseraQ(W3, None, TesseraQOptions(**TRAIN)))
    assert untrained == pytest.approx(rtn, rel=1e-6)
    assert trained < 0.7 * rtn


def test_exports_hold_tesseraqs_codes(tmp_path):
    """The AutoAWQ and GPTQ files unpack to the fake-quant weights bit for bit (float16 scales)."""
    from test_export_packed import assert_packed_exports_hold
    from tiny import make_tokenizer

    args = QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32, scale_dtype="float16")
    model = make_model("llama")
    algo = TesseraQ(args, None, TesseraQOptions(iterations=3, thresholds=[0.5, 0.1], scale_lr=1e-2))
    quantize_blocks(model, adapter_class("llama", None)(model), algo, _batches(model, 2, 2), set(), RunContext(),
                    quant_out=True)
    assert_packed_exports_hold(model, tmp_path, group=32)


# ---- AWQ → TesseraQ ---------------------------------------------------------------------------------
def _fake_linears(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return {k: v for k, v in tensors.items() if k.endswith("proj.weight")}


WEIGHT = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32, "calib_algo": "learnable"}


def _calib(wiki_files):
    return {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2}


def _awq(state=None):
    special = {"trans_version": "v2", "clip_sym": False}
    if state:
        special.update(save_scale=True, scale_path=state, save_clip=True, clip_path=state)
    return {"method": "Awq", "weight": WEIGHT, "quant_out": True, "special": special}


def _tesseraq(iterations, state=None):
    special = {"iterations": iterations, "thresholds": [0.5, 0.1], "lr": 0.005, "batch_size": 2,
               "load_transform": True, "weight_clip": True, "clip_version": "v2"}
    if state:
        special.update(scale_path=state, clip_path=state)
    return {"method": "TesseraQ", "weight": {**WEIGHT, "ste": True}, "quant_out": True, "special": special}


def test_awq_then_tesseraq_without_training_keeps_awqs_fake_weights(make_config, tmp_path, wiki_files, DELETE):
    """LLMC's hand-off (AWQ's scales folded into the original weights, the grid from AWQ's clips), in one
    process: with no training the rounding is round-to-nearest, so the fake weights are AWQ's bit for bit."""
    common = {"calib": _calib(wiki_files), "eval": DELETE}
    awq = make_config({**common, "quant": _awq(), "save": {"save_path": str(tmp_path / "awq"), "save_fake": True}},
                      name="awq.yml")
    assert main(["--config", awq]) == 0
    both = make_config({**common, "quant": DELETE, "stages": [_awq(), _tesseraq(0)],
                        "save": {"save_path": str(tmp_path / "both"), "save_fake": True}}, name="both.yml")
    assert main(["--config", both]) == 0
    ref = _fake_linears(tmp_path / "awq" / "fake_quant_model")
    got = _fake_linears(tmp_path / "both" / "fake_quant_model")
    assert len(ref) == 21 and got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_awq_then_tesseraq_in_memory_equals_through_files(make_config, tmp_path, wiki_files):
    state = str(tmp_path / "state")
    calib = _calib(wiki_files)
    s1 = make_config({"calib": calib, "quant": _awq(state), "save": {"save_path": str(tmp_path / "s1")}}, name="s1.yml")
    assert main(["--config", s1]) == 0
    s2 = make_config({"calib": calib, "quant": _tesseraq(3, state), "save": {"save_path": str(tmp_path / "s2")}},
                     name="s2.yml")
    assert main(["--config", s2]) == 0  # on the original model: load_transform folds the saved scales
    both = make_config({"calib": calib, "save": {"save_path": str(tmp_path / "both")}}, name="both.yml")
    raw = yaml.safe_load(open(both))
    del raw["quant"]
    raw["stages"] = [_awq(), _tesseraq(3)]
    Path(both).write_text(yaml.safe_dump(raw))
    assert main(["--config", both]) == 0
    ppl = [{e["pos"]: e["ppl"] for e in json.loads((tmp_path / s / "results.json").read_text())["evals"]}
           for s in ("s2", "both")]
    assert ppl[1]["fake_quant"] == pytest.approx(ppl[0]["fake_quant"], rel=1e-6)
    assert ppl[1]["fake_quant"] != ppl[1]["pretrain"]


def test_clip_version_v1_searches_and_clips_here(make_config, wiki_files, tmp_path):
    path = make_config({"calib": _calib(wiki_files), "quant": {"method": "TesseraQ", "weight": WEIGHT, "special": {
        "iterations": 2, "thresholds": [0.5], "weight_clip": True, "clip_version": "v1"}}})
    assert main(["--config", path]) == 0


LLMC_SPECIAL = {  # every key of LLMC's configs/quantization/methods/Tesseraq/tesseraq_w_only.yml, small sizes
    "lr": 0.0005, "iterations": 2, "wd": 0.0, "batch_size": 2, "deactive_amp": False, "aug_loss": False,
    "optimize_scale": True, "scale_lr": 0.0005, "thresholds": [0.75, 0.5, 0.375, 0.25, 0.125, 0.09, 0.06, 0.04,
                                                                  0.02, 0.005],
    "weight_clip": True, "load_transform": False, "reduce_memory": True, "clip_version": "v1",
    "scale_path": "/path/to/scale", "clip_path": "/path/to/clip"}


def test_an_llmc_style_config_runs(make_config, wiki_files):
    from loguru import logger

    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32, "calib_algo": "learnable",
              "ste": True}
    path = make_config({"calib": _calib(wiki_files), "quant": {"method": "TesseraQ", "weight": weight,
                                                               "special": LLMC_SPECIAL, "quant_out": True}})
    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    try:
        assert main(["--config", path]) == 0
    finally:
        logger.remove(sink)
    assert any("reduce_memory" in m for m in seen) and any("scale_path/clip_path unused" in m for m in seen)


@pytest.mark.parametrize("special, weight, key, value", [
    ({"wd": 0.1}, {}, "quant.special.wd", "0.1"),
    ({"thresholds": [0.5, 0.75]}, {}, "quant.special.thresholds", "0.75"),
    ({"thresholds": [1.5]}, {}, "quant.special.thresholds", "1.5"),
    ({"thresholds": [], "iterations": 5}, {}, "quant.special.thresholds", "[]"),
    ({"optimize_scale": False, "scale_lr": 0.01}, {}, "quant.special.scale_lr", "0.01"),
    ({"clip_version": "v2"}, {}, "quant.special.clip_version", "v2"),
    ({"weight_clip": True, "clip_version": "v2", "clip_sym": True, "clip_path": "x"}, {}, "quant.special.clip_sym",
     "True"),
    ({"weight_clip": True, "clip_version": "v2"}, {}, "quant.special.clip_path", "clip_path"),
    ({"load_transform": True, "scale_path": "nowhere"}, {}, "quant.special.scale_path", "nowhere"),
    ({"clip_version": "v3", "weight_clip": True}, {}, "clip_version", "v3"),
    ({}, {"bit": "e4m3", "symmetric": True}, "quant.weight.bit", "e4m3"),
    ({}, {"round_zp": False}, "quant.weight.round_zp", "False"),
    ({}, {"ste": False}, "quant.weight.ste", "False"),
])
def test_bad_options_are_refused_before_loading(make_config, wiki_files, capsys, special, weight, key, value):
    path = make_config({"calib": _calib(wiki_files), "quant": {"method": "TesseraQ", "special": special,
                                                               "weight": weight}})
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert key in err and value in err


def test_fused_soft_quantizer_matches_autograd_on_the_formula():
    """Values and gradients (rounding variables, scale factors) of the fused function equal autograd through
    (clamp(floor(w/s) + rectified_sigmoid(alpha) + z) - z)·s·2·rectified_sigmoid(v), hardened entries included."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=g)
    scale, zero = calibrate(grouped(w, W3), W3)
    r = SoftRounding(w, scale, zero, W3, optimize_scale=True)
    with torch.no_grad():
        r.alpha.add_(torch.randn(r.alpha.shape, generator=g))
        r.factor.copy_(torch.randn(r.factor.shape, generator=g) * 0.3)
    r.harden(0.6)
    upstream = torch.randn(8, 64, generator=g)
    (r.fake_quant(w) * upstream).sum().backward()
    alpha = r.alpha.detach().clone().requires_grad_(True)
    factor = r.factor.detach().clone().requires_grad_(True)
    h = torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0, 1)
    f = 2 * torch.clamp(torch.sigmoid(factor) * 1.2 - 0.1, 0, 1)
    t = grouped(w, W3) / scale
    ref = ((torch.clamp(torch.floor(t) + h + zero, -4, 3) - zero) * scale * f).reshape(w.shape)
    (ref * upstream).sum().backward()
    assert torch.allclose(r.fake_quant(w), ref, atol=1e-6)
    assert torch.allclose(r.alpha.grad, alpha.grad, atol=1e-6)
    assert torch.allclose(r.factor.grad, factor.grad, atol=1e-5)
    assert (r.alpha.grad[~torch.isfinite(r.alpha)] == 0).all()
