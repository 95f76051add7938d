"""LLM.int8(): the fake-quant forward equals the paper's decomposition written here (float product of the
outlier features and their weight columns + int8 product of the rest, per-token x per-output-channel), with
the outlier set found anew in every call; the LLMC-style config runs end to end, its fake-quant model
reloads to the same PPL, and bad keys are refused before loading."""
import json

import pytest
import torch

from llmc.cli import main
from llmc.data import load_eval_text
from llmc.engine.context import RunContext
from llmc.evaluation.ppl import eval_windows, perplexity
from llmc.export.save import load_fake_quant
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs
from tiny import make_tokenizer


def decomposed(x, W, b, threshold, bits=8):
    """LLM.int8() written out: outlier features (any |x| >= threshold) in float; the rest as integer codes,
    x per token and W per output row, each with step absmax / ((2^b - 1) / 2), multiplied as integers and
    rescaled by the outer product of the two steps."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.abs().amax(0) >= threshold
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    xi, Wi = flat[:, ~out], W[:, ~out]
    sx = xi.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2)
    sw = Wi.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2)
    cx = torch.clamp(torch.round(xi / sx), lo, hi)
    cw = torch.clamp(torch.round(Wi / sw), lo, hi)
    y = (cx.double() @ cw.double().T) * (sx.double() @ sw.double().T)
    y = y + flat[:, out].double() @ W[:, out].double().T + b.double()
    return y.float().reshape(*x.shape[:-1], W.shape[0]), torch.nonzero(out).flatten().tolist()


def _layer(threshold=6.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 20)
    q = QuantLinear(lin, QuantArgs(bit=8, symmetric=True, granularity="per_channel"),
                    QuantArgs(bit=8, symmetric=True, granularity="per_token"))
    q.outlier_threshold = threshold
    return q, lin.weight.detach().clone(), lin.bias.detach().clone()


@pytest.mark.parametrize("outliers", [[], [5], [2, 9, 30]])
def test_forward_is_the_float_plus_int8_decomposition(outliers):
    q, W, b = _layer()
    x = torch.randn(2, 7, 32)
    for k, c in enumerate(outliers):
        x[k % 2, k, c] = 9.0 + k  # one token is enough to make the whole feature an outlier
    with torch.no_grad():
        got = q(x)
    ref, found = decomposed(x, W, b, 6.0)
    assert found == outliers
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if outliers:  # not plain W8A8: quantizing the outliers too gives another result
        plain = QuantLinear(torch.nn.Linear(32, 20), q.wargs, q.act_quant.args)
        plain.weight.data.copy_(W)
        plain.bias.data.copy_(b)
        with torch.no_grad():
            assert (plain(x) - ref).abs().max() > 1e-3
        assert (plain(x) - x.matmul(W.T) - b).pow(2).mean() > (got - x.matmul(W.T) - b).pow(2).mean()


def test_outlier_set_is_found_per_call():
    q, W, b = _layer()
    x1, x2 = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    x1[0, 0, 3], x2[0, 1, 11] = 8.0, -7.0
    with torch.no_grad():
        y1, y2 = q(x1), q(x2)
    torch.testing.assert_close(y1, decomposed(x1, W, b, 6.0)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, decomposed(x2, W, b, 6.0)[0], rtol=1e-5, atol=1e-5)


def _config(make_config, special=None, quant=None, save=None):
    q = {"method": "LlmInt8", "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
         "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
         "special": {"threshold": 6.0, **(special or {})}}
    q.update(quant or {})
    return make_config({"quant": q, "save": {"save_fake": True, **(save or {})}})


def test_llmc_style_config_runs_and_the_fake_quant_model_reloads(make_config, wiki_files, tmp_path):
    # threshold 1: the tiny model's activations are small, so this makes outliers in every linear
    assert main(["--config", _config(make_config, {"threshold": 1.0})]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ppl = {e["pos"]: e["ppl"] for e in res["evals"]}
    model = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.outlier_threshold == 1.0 and down.wargs.bit == 8
    windows = eval_windows(make_tokenizer(), load_eval_text("wikitext2", wiki_files["test"], False), 64, 4)
    adapter = adapter_class("llama", None)(model)
    reloaded = perplexity(model, adapter, windows, 2, RunContext(), per_block=False)
    assert reloaded == pytest.approx(ppl["fake_quant"], rel=1e-5)
    for m in model.modules():  # plain W8A8 on the same weights differs: the decomposition is in play
        if isinstance(m, QuantLinear):
            m.outlier_threshold = None
    assert perplexity(model, adapter, windows, 2, RunContext(), per_block=False) != pytest.approx(reloaded, rel=1e-6)


@pytest.mark.parametrize("special, quant, save, words", [
    ({"threshold": 0}, None, None, ["threshold"]),
    ({"treshold": 6.0}, None, None, ["treshold"]),
    ({}, {"act": None}, None, ["quant.act", "LlmInt8"]),
    ({}, {"act": {"bit": 8, "granularity": "per_tensor", "static": True}}, None, ["quant.act.static"]),
    ({}, {"weight": {"bit": 8, "granularity": "per_group", "group_size": 16}}, None, ["quant.weight.granularity"]),
    ({}, None, {"save_vllm": True}, ["save.save_vllm", "LlmInt8"]),
])
def test_bad_keys_refused_before_loading(make_config, capsys, special, quant, save, words):
    assert main(["--config", _config(make_config, special, quant, save)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
