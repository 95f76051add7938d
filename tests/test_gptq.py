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


# ---- against the paper's column loop ------------------------------------------------------------------
def _grid(block: torch.Tensor, bit: int, symmetric: bool):
    """Per-row (scale, zero) on llmc's signed grid, float64, written independently of llmc."""
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
    if symmetric:
        return torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    scale = (hi - lo) / (qmax - qmin)
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def _paper_gptq(W, H, bit, symmetric, gs, percdamp=0.01, actorder=False, static_groups=False):
    """GPTQ from the paper's equations, one column at a time with the explicit inverse Hessian: quantize
    column q, spread its error over the remaining columns, δ = -(w_q - Q(w_q)) / [H⁻¹]_qq · [H⁻¹]_{q,:},
    then remove q from the inverse, H⁻¹ ← H⁻¹ - H⁻¹_{:,q} H⁻¹_{q,:} / [H⁻¹]_qq. No lazy batches, no Cholesky."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [_grid(W[:, g:g + gs], bit, symmetric) for g in range(0, cols, gs)] if static_groups else None
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for q in range(cols):
        if static is not None:
            scale, zero = static[perm[q] // gs]
        elif q % gs == 0:
            scale, zero = _grid(W[:, q:q + gs], bit, symmetric)
        w, d = W[:, q], Hinv[q, q]
        Q[:, q] = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
        W[:, q:] -= torch.outer((w - Q[:, q]) / d, Hinv[q, q:])
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / d
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("case", [
    dict(bit=4, symmetric=True, gran="per_channel"),
    dict(bit=3, symmetric=False, gran="per_group"),
    dict(bit=3, symmetric=False, gran="per_group", actorder=True),
    dict(bit=2, symmetric=True, gran="per_group", actorder=True, static_groups=True),
])
def test_gptq_equals_the_papers_column_loop(case):
    """llmc's blocked Cholesky GPTQ (blocksize 16, so lazy updates cross block edges) gives the weights
    of the explicit-inverse loop. Blocks of 16 divide the 32-column groups, so a group's range is found on
    fully updated weights in both (the reference, and llmc, find it without the current block's pending
    updates when a group starts inside a block)."""
    W, X, H = _problem(5, rows=24, cols=128, tokens=512)
    H[7, :] = H[:, 7] = 0  # a dead input
    gs = 32 if case["gran"] == "per_group" else 128
    args = QuantArgs(bit=case["bit"], symmetric=case["symmetric"], granularity=case["gran"],
                     group_size=gs if case["gran"] == "per_group" else -1)
    opts = GPTQOptions(blocksize=16, actorder=case.get("actorder", False),
                       static_groups=case.get("static_groups", False))
    Q, *_ = gptq_quantize(W, H.clone(), args, opts)
    want = _paper_gptq(W, H, case["bit"], case["symmetric"], gs, actorder=opts.actorder,
                       static_groups=opts.static_groups)
    assert torch.allclose(Q.double(), want, atol=1e-4), (Q.double() - want).abs().max()


@pytest.mark.parametrize("special,words", [
    ({"percdamp": 2.0}, ["quant.special.percdamp", "less than or equal to 1"]),
    ({"percdamp": 0}, ["quant.special.percdamp", "greater than 0"]),
    ({"owq": True}, ["quant.special.n_outs", "required with owq: True"]),
    ({"chunk_num": 0}, ["quant.special.chunk_num"]),
])
def test_bad_options_are_refused_before_loading(make_config, wiki_files, special, words):
    from llmc.config.checks import check_config
    from llmc.config.loader import load_config
    from llmc.errors import ConfigError

    path = make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 16},
                        "quant": {"method": "GPTQ", "special": special}})
    with pytest.raises(ConfigError) as err:
        check_config(load_config(path))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_chunk_num_is_accepted_with_one_log_line():
    """LLMC's chunk_num splits each Hessian's token sum (memory only): accepted, one line per run."""
    from loguru import logger

    from llmc.algorithms.gptq import GPTQ

    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    try:
        for chunks in (1, 4):
            GPTQ(QuantArgs(bit=4), None, GPTQOptions.model_validate({"chunk_num": chunks}))
    finally:
        logger.remove(sink)
    lines = [m for m in seen if "chunk_num" in m]
    assert len(lines) == 1 and "chunk_num 4 only bounds memory" in lines[0]


@pytest.mark.parametrize("opts", [GPTQOptions(), GPTQOptions(actorder=True), GPTQOptions(actorder=True, static_groups=True)],
                         ids=["plain", "actorder", "static_groups"])
@pytest.mark.parametrize("args", [QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32,
                                            calib_algo="mse"), QuantArgs(bit=4, granularity="per_channel")],
                         ids=["g32-mse", "per_channel"])
def test_stacked_solve_equals_each_linear_alone(args, opts):
    """Linears sharing an input are solved as one matrix of their rows: each must get exactly its own GPTQ."""
    from llmc.algorithms.gptq import stacked_gptq

    torch.manual_seed(0)
    X = torch.randn(512, 96)
    X[:, 3] *= 8
    H = 2 * X.T @ X / 512
    weights = [torch.randn(rows, 96) for rows in (40, 24, 40)]
    for W, got in zip(weights, stacked_gptq(weights, H.clone(), args, opts, "test")):
        alone = gptq_quantize(W, H.clone(), args, opts)
        for a, b in zip(got[:4], alone):
            assert (a is None and b is None) or torch.equal(a, b)


def test_hessian_sums_share_one_matrix_only_while_inputs_are_the_same_tensor():
    from llmc.algorithms.hessian import HessianSums

    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    other = [torch.randn(2, 5, 8) for _ in range(3)]
    sums = HessianSums()
    # a and b read one tensor in every batch; c and d read one in the first two, then different ones;
    # e fires only in the last batch
    for k, x in enumerate(xs):
        sums.add("a", x)
        sums.add("b", x)
        sums.add("c", other[k])
        sums.add("d", other[k] if k < 2 else other[k].clone() * 2)
        if k == 2:
            sums.add("e", x)
        sums.end_batch()
    H = sums.hessians(lambda t: t)

    def direct(tensors):
        rows = torch.cat([t.reshape(-1, 8) for t in tensors])
        return 2 * rows.T @ rows / rows.shape[0]

    assert H["a"] is H["b"] and H["c"] is not H["d"] and H["e"] is not H["a"]
    for name, want in (("a", direct(xs)), ("c", direct(other)), ("d", direct(other[:2] + [other[2] * 2])),
                       ("e", direct(xs[2:]))):
        assert torch.allclose(H[name], want, atol=1e-5), name
