"""QUIK: each linear's float features are exactly the ones of largest calibration peak (max |x|, computed here
from the block's own inputs), float in weight and activation; outlier features kept float cut a layer's
output error; last_fc_bit reaches the MLP's output projection only; LLMC-style configs run end to end and
the saved fake-quant model reloads to the same PPL; bad keys are refused before loading."""
import json
import math

import pytest
import torch

from llmc.algorithms.gptq import GPTQOptions, gptq_quantize
from llmc.algorithms.quik import QUIK, QUIKOptions, last_fc_layers, outlier_features
from llmc.cli import main
from llmc.engine.block import BlockJob
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.evaluation.ppl import eval_windows, perplexity
from llmc.data import load_eval_text
from llmc.export.save import load_fake_quant
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs
from tiny import make_model, make_tokenizer


def sym_rows(x, bits):
    """Symmetric fake quantization of each row (the last dim), step absmax / ((2^b - 1) / 2), signed grid."""
    step = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / ((2 ** bits - 1) / 2)
    return torch.clamp(torch.round(x / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * step


def _job(model, seed=3, n=4, bs=2, length=24):
    adapter = adapter_class("llama", None)(model)
    g = torch.Generator().manual_seed(seed)
    batches = list(torch.randint(0, model.config.vocab_size, (n * bs, length), generator=g).split(bs))
    ctx = RunContext()
    inputs = capture_block_inputs(model, adapter, batches, ctx)
    return BlockJob(0, "model.layers.0", adapter.block_list()[0], adapter.subsets, inputs, set(), ctx), adapter


def test_float_features_are_the_largest_peaks_and_stay_float():
    model = make_model("llama")
    with torch.no_grad():  # two planted outlier features in the attention input
        model.model.layers[0].input_layernorm.weight[[7, 40]] *= 30
    job, adapter = _job(model)
    wargs = QuantArgs(bit=4, symmetric=True, granularity="per_channel")
    aargs = QuantArgs(bit=4, symmetric=True, granularity="per_token")
    n = 5
    QUIK(wargs, aargs, QUIKOptions(fp_features=n)).apply(job, None)

    # Each linear's input depends only on the linears before it, so a forward of the finished block shows
    # every linear the inputs it was calibrated on (true_sequential).
    peaks = {}
    names = job.quantized_layers()
    hooks = [job.module(name).register_forward_pre_hook(
        lambda m, inp, name=name: peaks.__setitem__(name, torch.maximum(
            peaks.get(name, torch.zeros(inp[0].shape[-1])), inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0))))
        for name in names]
    job.forward()
    for h in hooks:
        h.remove()
    for name in names:
        q = job.module(name)
        expect = sorted(torch.topk(peaks[name], n).indices.tolist())
        assert q.w_float_cols.tolist() == expect, name
        assert q.a_float_cols.tolist() == expect, name
        if name.startswith("self_attn.q"):
            assert {7, 40} <= set(expect)
        # weight: the other columns on the per-row 4-bit grid, the float ones (GPTQ-compensated) off it
        w = q.fake_weight()
        rest = [c for c in range(q.in_features) if c not in expect]
        step = q.w_scale.reshape(-1, 1)
        code = w[:, rest] / step
        assert torch.allclose(code, code.round(), atol=1e-4) and code.abs().max() <= 8 + 1e-4
        off = w[:, expect] / step
        assert not torch.allclose(off, off.round(), atol=1e-4)
        # activation: float features pass exactly, the others per token on the 4-bit grid of their own range
        x = torch.randn(3, 6, q.in_features) * 2
        x[..., expect] *= 50
        with torch.no_grad():
            got = q(x)
        xq = x.clone()
        xq[..., rest] = sym_rows(x[..., rest], 4)
        torch.testing.assert_close(got, torch.nn.functional.linear(xq, w), rtol=1e-5, atol=1e-5)


def test_outlier_features_kept_float_cut_the_layer_error():
    torch.manual_seed(0)
    W = torch.randn(48, 64) * 0.1
    X = torch.randn(1024, 64)
    X[:, [3, 17, 40, 51]] *= 25  # outlier input features
    H = 2 * X.T @ X / X.shape[0]
    wargs = QuantArgs(bit=4, symmetric=True, granularity="per_channel")
    aargs = QuantArgs(bit=4, symmetric=True, granularity="per_token")
    ref = X @ W.T

    def layer_error(keep):
        Q, scale, zero, g_idx = gptq_quantize(W, H.clone(), wargs, GPTQOptions(), keep=keep)
        q = QuantLinear(torch.nn.Linear(64, 48, bias=False), wargs, aargs)
        q.weight.data.copy_(Q)
        q.set_weight_qparams(scale, zero, g_idx, float_cols=keep)
        q.set_act_float_cols(keep)
        with torch.no_grad():
            return (q(X) - ref).pow(2).mean().item()

    keep = outlier_features(X.abs().amax(0), 4, 0.0)
    assert keep.tolist() == [3, 17, 40, 51]
    assert layer_error(keep) < 0.1 * layer_error(None)
    assert outlier_features(X.abs().amax(0), 4, threshold=1e6) is None  # fp_threshold above every peak


def test_last_fc_layers_are_the_mlp_output_projections():
    assert last_fc_layers(adapter_class("llama", None)(make_model("llama")).subsets,
                          ["mlp.down_proj", "mlp.up_proj"]) == {"mlp.down_proj"}
    assert last_fc_layers(adapter_class("opt", None)(make_model("opt")).subsets, ["fc1", "fc2"]) == {"fc2"}
    moe = adapter_class("qwen3_moe", None)(make_model("qwen3_moe"))
    subsets = moe.block_subsets(0)
    names = [n for s in subsets for n in s.layers]
    downs = {n for n in names if n.endswith("down_proj")}
    assert downs and last_fc_layers(subsets, names) == downs


def _windows(wiki_test):
    return eval_windows(make_tokenizer(), load_eval_text("wikitext2", wiki_test, False), 64, 4)


def _quik_config(make_config, wiki_files, special=None, act=None, save=None, **extra):
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 32, "bs": 4}
    weight = {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1}
    act = act or {"bit": 4, "symmetric": True, "granularity": "per_token"}
    special = {"fp_relative": False, "fp_features": 8, "fp_threshold": 0.0, "last_fc_bit": 8, **(special or {})}
    return make_config({"calib": calib, "quant": {"method": "QUIK", "weight": weight, "act": act, "special": special,
                                                  "quant_out": True},
                        "save": {"save_fake": True, **(save or {})}, **extra})


def test_llmc_style_config_runs_and_the_fake_quant_model_reloads(make_config, wiki_files, tmp_path):
    path = _quik_config(make_config, wiki_files, {"fp_relative": True})
    assert main(["--config", path]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ppl = {e["pos"]: e["ppl"] for e in res["evals"]}
    assert math.isfinite(ppl["fake_quant"]) and ppl["fake_quant"] != ppl["pretrain"]
    model = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    layer = model.model.layers[1]
    # fp_relative: down_proj (128 inputs, hidden 64) keeps twice the features; it runs at last_fc_bit
    assert len(layer.self_attn.q_proj.a_float_cols) == 8 and len(layer.mlp.down_proj.a_float_cols) == 16
    assert layer.mlp.down_proj.act_quant.args.bit == 8 and layer.mlp.up_proj.act_quant.args.bit == 4
    adapter = adapter_class("llama", None)(model)
    reloaded = perplexity(model, adapter, _windows(wiki_files["test"]), 2, RunContext(), per_block=False)
    assert reloaded == pytest.approx(ppl["fake_quant"], rel=1e-5)
    # the float features carry the outliers: without them (all features quantized) the reload is worse
    for _, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        q.a_float_cols = None
    worse = perplexity(model, adapter, _windows(wiki_files["test"]), 2, RunContext(), per_block=False)
    assert worse != pytest.approx(reloaded, rel=1e-6)


def test_last_fc_bit_sets_down_proj_bits(make_config, wiki_files, tmp_path):
    path = _quik_config(make_config, wiki_files, {"last_fc_bit": 6})
    assert main(["--config", path]) == 0
    record = json.loads((tmp_path / "out" / "fake_quant_model" / "llmc_quant.json").read_text())["layers"]
    assert record["model.layers.0.mlp.down_proj"]["act"]["bit"] == 6
    assert "int6" in record["model.layers.0.mlp.down_proj"]["weight"]
    assert record["model.layers.0.mlp.gate_proj"]["act"]["bit"] == 4


@pytest.mark.parametrize("special, act, save, words", [
    ({"fp_features": 64}, None, None, ["quant.special.fp_features", "64 float features", "expected fewer"]),
    ({"fp_features": -1}, None, None, ["fp_features"]),
    ({"fp_feature": 8}, None, None, ["fp_feature", "fp_features"]),
    ({"owq": True}, None, None, ["quant.special.owq", "QUIK"]),
    ({"last_fc_bit": 12}, None, None, ["last_fc_bit"]),
    ({"static_groups": True}, None, None, ["quant.special.static_groups", "QUIK"]),
    ({}, {"bit": 8, "granularity": "per_group", "group_size": 16}, None, ["quant.act.granularity", "per_token"]),
    ({}, None, {"save_vllm": True}, ["save.save_vllm", "QUIK"]),
])
def test_bad_keys_refused_before_loading(make_config, wiki_files, capsys, special, act, save, words):
    path = _quik_config(make_config, wiki_files, special, act, save)
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_last_fc_bit_beside_mix_bits_is_refused(make_config, wiki_files, capsys):
    """Both set down_proj's bits: refused, rather than one silently overriding the other."""
    import yaml

    path = _quik_config(make_config, wiki_files)
    raw = yaml.safe_load(open(path))
    raw["quant"]["mix_bits"] = {"setting_0": {"layer_name": ["down_proj"], "do_quant": True,
                                              "weight": {"bit": 6, "symmetric": True, "granularity": "per_channel"}}}
    open(path, "w").write(yaml.safe_dump(raw))
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "quant.special.last_fc_bit" in err and "mix_bits" in err, err
    del raw["quant"]["special"]["last_fc_bit"]
    open(path, "w").write(yaml.safe_dump(raw))
    assert main(["--config", path, "--dry-run"]) == 0


def test_fp_features_is_required(make_config, wiki_files, capsys):
    import yaml

    path = _quik_config(make_config, wiki_files)
    raw = yaml.safe_load(open(path))
    del raw["quant"]["special"]["fp_features"]
    open(path, "w").write(yaml.safe_dump(raw))
    assert main(["--config", path]) == 2
    assert "fp_features" in capsys.readouterr().err


def test_static_act_range_leaves_out_the_float_features():
    q = QuantLinear(torch.nn.Linear(16, 4), None, QuantArgs(bit=8, granularity="per_tensor", static=True))
    q.set_act_float_cols(torch.tensor([2, 9]))
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16)
    x[..., [2, 9]] *= 100
    q.act_quant.observing = True
    with torch.no_grad():
        q(x)
    q.act_quant.observing = False
    q.act_quant.finish_observation({k: v for k, (v, _) in q.act_quant.observed_stats().items()})
    rest = [c for c in range(16) if c not in (2, 9)]
    step = x[..., rest].abs().max() / 127.5
    assert q.act_quant.scale.item() == pytest.approx(step.item(), rel=1e-6)
    with torch.no_grad():
        got = q(x)
    xq = x.clone()
    xq[..., rest] = torch.clamp(torch.round(x[..., rest] / step), -128, 127) * step
    torch.testing.assert_close(got, q.weight.detach().matmul(xq.unsqueeze(-1)).squeeze(-1) + q.bias.detach(),
                               rtol=1e-5, atol=1e-5)


def test_dynamic_per_token_act_ranges_follow_each_new_float_set():
    """Changing the float features (a new QUIK calibration) must move the per-token ranges with them."""
    q = QuantLinear(torch.nn.Linear(12, 3), None, QuantArgs(bit=4, symmetric=False, granularity="per_token"))
    torch.manual_seed(2)
    x = torch.randn(2, 4, 12)
    x[..., 3] *= 50
    x[..., 7] *= 20
    for cols in ([3], [3, 7], [7, 0]):
        q.set_act_float_cols(torch.tensor(cols))
        rest = [c for c in range(12) if c not in cols]
        lo = x[..., rest].amin(-1, keepdim=True).clamp(max=0)
        hi = x[..., rest].amax(-1, keepdim=True).clamp(min=0)
        step = (hi - lo) / 15
        zero = torch.round(-lo / step)
        xq = x.clone()
        xq[..., rest] = (torch.clamp(torch.round(x[..., rest] / step) + zero, 0, 15) - zero) * step
        with torch.no_grad():
            got = q(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(xq, q.weight, q.bias), rtol=1e-5, atol=1e-5)
