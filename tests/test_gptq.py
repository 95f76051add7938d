import json

import pytest
import torch

from llmc.algorithms.gptq import GPTQOptions, gptq_quantize, inverse_hessian_factor
from llmc.cli import main
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs, fake_quant, grouped


def _problem(seed=0, rows=48, cols=128, tokens=1024):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.2) \
        + torch.randn(tokens, cols, generator=g)
    return W, X, 2 * X.T @ X / tokens


def _err(A, W, X):
    return ((A - W) @ X.T).pow(2).sum().item()


@pytest.mark.parametrize("bit", [2, 3, 4, 8])
@pytest.mark.parametrize("gran", ["per_group", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_below_rtn(bit, gran, symmetric):
    W, X, H = _problem(bit)
    args = QuantArgs(bit=bit, symmetric=symmetric, granularity=gran, group_size=32 if gran == "per_group" else -1)
    Q, *_ = gptq_quantize(W, H, args, GPTQOptions())
    assert _err(Q, W, X) < _err(fake_quant(W, args), W, X)


@pytest.mark.parametrize("static_groups", [True, False])
def test_actorder_result_is_a_valid_grid(static_groups):
    W, X, H = _problem(1)
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32)
    Q, scale, zero, g_idx = gptq_quantize(W, H, args, GPTQOptions(actorder=True, static_groups=static_groups))
    if static_groups:
        assert g_idx is None  # contiguous groups: a standard checkpoint layout
        s, z = scale.view(48, 4).repeat_interleave(32, 1), zero.view(48, 4).repeat_interleave(32, 1)
    else:
        s, z = scale[:, g_idx], zero[:, g_idx]
    codes = Q / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # every weight equals scale * (q - zero)
    assert codes.round().min() >= -4 and codes.round().max() <= 3
    q = QuantLinear(torch.nn.Linear(128, 48, bias=False), args)
    q.weight.data.copy_(Q)
    q.set_weight_qparams(scale, zero, g_idx)
    assert torch.allclose(q.fake_weight(), Q, atol=1e-6)  # the fake-quant module reproduces GPTQ's weight
    assert _err(Q, W, X) < _err(fake_quant(W, args), W, X)


def test_cholesky_failure_raises_damping_and_logs():
    from loguru import logger

    X = torch.randn(512, 8) @ torch.randn(8, 64)  # rank 8 of 64
    H = 2 * X.T @ X / 512
    H -= torch.eye(64) * 1e-3 * torch.diag(H).mean()  # a little negative: percdamp 0.01 of the mean is not enough
    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        U = inverse_hessian_factor(H, 0.0001, "test")
    finally:
        logger.remove(sink)
    assert any("Cholesky failed" in m for m in seen)
    assert torch.isfinite(U).all()
    W = torch.randn(16, 64)
    Q, *_ = gptq_quantize(W, H.clamp(min=-1e9), QuantArgs(bit=4, granularity="per_channel"), GPTQOptions(percdamp=0.0001))
    assert torch.isfinite(Q).all()


def test_dead_inputs_are_zeroed():
    W, X, H = _problem(2)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    Q, *_ = gptq_quantize(W, H, QuantArgs(bit=4, granularity="per_channel"), GPTQOptions())
    assert torch.all(Q[:, 5] == 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_gptq_cli_beats_rtn_on_tiny_model(make_config, tmp_path, wiki_files, tiny_dir, family):
    """Random tiny models have no meaningful PPL; compare the logits' error against the float model."""
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant
    from tiny import make_tokenizer

    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 16, "seq_len": 64, "bs": 4}
    weight = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
    ids = make_tokenizer()(open(wiki_files["test"]).read()[:3000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir(family))(ids).logits
    err = {}
    for method, special in [("RTN", {}), ("GPTQ", {"actorder": True, "static_groups": True})]:
        path = make_config({"calib": calib, "eval": {"eval_pos": ["fake_quant"], "num_samples": 2},
                            "quant": {"method": method, "weight": weight, "special": special},
                            "save": {"save_path": str(tmp_path / method), "save_fake": True}},
                           family=family, name=f"{method}.yml")
        assert main(["--config", path]) == 0
        with torch.no_grad():
            logits = load_fake_quant(tmp_path / method / "fake_quant_model")(ids).logits
        err[method] = (logits - ref).pow(2).mean().item()
    assert err["GPTQ"] < 0.8 * err["RTN"]


@pytest.mark.parametrize("d", [100, 500, 1536])
def test_symmetric_gram_accumulation_equals_full_product(d):
    """The Hessian sum written on its upper block triangle only gives back xᵀx summed over batches."""
    from llmc.algorithms.gptq import add_gram, symmetric_gram

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, d, generator=g, dtype=torch.float64) for _ in range(3)]
    total = torch.zeros(d, d, dtype=torch.float64)
    for x in batches:
        add_gram(total, x)
    full = sum(x.T @ x for x in batches)
    assert torch.allclose(symmetric_gram(total), full, rtol=0, atol=1e-9)
