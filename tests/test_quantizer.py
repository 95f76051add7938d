import pytest
import torch

from llmc.quant.fake_linear import ActQuantizer, QuantLinear
from llmc.quant.quantizer import QuantArgs, calibrate, dequantize, fake_quant, grouped, quant_dequant, quantize


def test_symmetric_int4_exact_values():
    args = QuantArgs(bit=4, symmetric=True, granularity="per_tensor")
    x = torch.tensor([[-1.5, -0.75, 0.0, 0.3, 1.5]])
    scale, zero = calibrate(grouped(x, args), args)
    assert scale.item() == pytest.approx(1.5 / 7.5)  # absmax / ((qmax - qmin) / 2)
    assert zero.item() == 0
    q = quantize(grouped(x, args), scale, zero, args)
    assert q.tolist() == [[-8.0, -4.0, 0.0, 2.0, 8.0 - 1]]  # 1.5 / 0.2 = 7.5 → rounds to 8, clamped to qmax 7
    assert fake_quant(x, args)[0].tolist() == pytest.approx([-1.6, -0.8, 0.0, 0.4, 1.4])


def test_asymmetric_int2_exact_values():
    args = QuantArgs(bit=2, symmetric=False, granularity="per_tensor")
    x = torch.tensor([[0.5, 1.0, 2.0, 3.0]])  # range widened to include 0: [0, 3], scale 1
    scale, zero = calibrate(grouped(x, args), args)
    assert scale.item() == pytest.approx(1.0) and zero.item() == -2  # qmin - min/scale
    q = quantize(grouped(x, args), scale, zero, args)
    assert q.tolist() == [[-2.0, -1.0, 0.0, 1.0]]  # round(0.5) = 0 (half to even)
    assert dequantize(q, scale, zero).tolist() == [[0.0, 1.0, 2.0, 3.0]]


@pytest.mark.parametrize("bit", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_error_bounded(bit, symmetric):
    torch.manual_seed(bit)
    w = torch.randn(16, 64)
    args = QuantArgs(bit=bit, symmetric=symmetric, granularity="per_group", group_size=16)
    scale, zero = calibrate(grouped(w, args), args)
    q = quantize(grouped(w, args), scale, zero, args)
    assert q.min() >= -(2 ** (bit - 1)) and q.max() <= 2 ** (bit - 1) - 1
    assert torch.equal(q, q.round())
    err = (dequantize(q, scale, zero) - grouped(w, args)).abs()
    # Round-to-nearest inside the range: at most half a step (the sym positive end can lose one step).
    bound = scale * (1.0 if symmetric else 0.5) + 1e-6
    assert bool((err <= bound).all())


@pytest.mark.parametrize("granularity,shape,rows", [
    ("per_tensor", (8, 32), 1), ("per_channel", (8, 32), 8), ("per_group", (8, 32), 32),
    ("per_token", (2, 5, 32), 10), ("per_head", (2, 5, 32), 40),
])
def test_granularity_gives_one_range_per_row(granularity, shape, rows):
    args = QuantArgs(bit=8, symmetric=True, granularity=granularity, group_size=8 if granularity == "per_group" else -1,
                     head_num=4 if granularity == "per_head" else None)
    x = torch.randn(shape)
    xg = grouped(x, args)
    assert xg.shape[0] == rows
    scale, _ = calibrate(xg, args)
    assert torch.allclose(scale.squeeze(1), xg.abs().amax(1) / 127.5)


def test_per_group_groups_run_along_in_features():
    args = QuantArgs(bit=8, symmetric=True, granularity="per_group", group_size=4)
    w = torch.zeros(2, 8)
    w[0, 4:] = 100.0  # only the second group of row 0 is large
    w[0, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = fake_quant(w, args)
    assert torch.allclose(out[0, :4], w[0, :4], atol=0.4 / 127.5)  # small group kept its fine grid


def test_mse_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[::7, ::5] *= 8  # outliers make clipping worthwhile
    for bit in (2, 3, 4):
        mm = QuantArgs(bit=bit, symmetric=False, granularity="per_group", group_size=32)
        mse = QuantArgs(bit=bit, symmetric=False, granularity="per_group", group_size=32, calib_algo="mse")
        e_mm = (fake_quant(w, mm) - w).abs().pow(2.4).reshape(-1, 32).sum(1)
        e_mse = (fake_quant(w, mse) - w).abs().pow(2.4).reshape(-1, 32).sum(1)
        assert bool((e_mse <= e_mm + 1e-5).all())
        assert e_mse.sum() < e_mm.sum() * 0.97


def test_fp8_weights_lie_on_the_float8_grid():
    args = QuantArgs(bit="e4m3", granularity="per_channel")
    w = torch.randn(4, 16)
    out = fake_quant(w, args)
    assert torch.equal(fake_quant(out, args), out)  # already on the grid: idempotent
    codes = (out / (w.abs().amax(1, keepdim=True) / 448.0))
    assert torch.allclose(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-5)
    assert (out - w).abs().max() < w.abs().max() * 0.07


def test_quant_linear_matches_primitives_and_toggles():
    lin = torch.nn.Linear(32, 8)
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)
    q = QuantLinear(lin, args)
    q.set_weight_qparams()
    x = torch.randn(5, 32)
    expected = torch.nn.functional.linear(x, fake_quant(lin.weight, args), lin.bias)
    assert torch.allclose(q(x), expected)
    q.quant_enabled = False
    assert torch.allclose(q(x), lin(x))
    assert set(q.state_dict()) == {"weight", "bias"}  # same keys as nn.Linear: checkpoints stay HF-shaped


def test_weight_on_its_grid_is_its_own_fake_weight_until_it_changes():
    """GPTQ leaves weights on their grid: the forward then uses the weight itself (no second copy),
    and a later change of the weight is quantized again."""
    lin = torch.nn.Linear(64, 16).requires_grad_(False)  # as the engine holds them
    args = QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32)
    q = QuantLinear(lin, args)
    scale, zero = calibrate(grouped(lin.weight, args), args)
    lin.weight.copy_(dequantize(quantize(grouped(lin.weight, args), scale, zero, args), scale, zero).reshape(16, 64))
    q.set_weight_qparams(scale, zero)
    assert q.fake_weight().data_ptr() == q.weight.data_ptr()
    with torch.no_grad():
        q.weight.add_(0.013)  # off the grid, same scales
    assert q.fake_weight().data_ptr() != q.weight.data_ptr()
    assert torch.equal(q.fake_weight(), dequantize(q.int_weight(), q.w_scale, q.w_zero).reshape(q.weight.shape))
    x = torch.randn(3, 64)
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.fake_weight(), q.bias))


def test_static_act_quantizer_calibrates_once_then_reuses():
    aq = ActQuantizer(QuantArgs(bit=8, symmetric=True, granularity="per_tensor", static=True))
    aq.observing = True
    aq(torch.tensor([[1.0, -2.0]]))
    aq(torch.tensor([[4.0, 0.5]]))
    aq.observing = False
    aq.finish_observation({k: v for k, (v, op) in aq.observed_stats().items()})
    assert aq.scale.item() == pytest.approx(4.0 / 127.5)
    out = aq(torch.tensor([[100.0, 1.0]]))  # beyond the calibrated range: clamped, not re-ranged
    assert out[0, 0].item() == pytest.approx(127 * 4.0 / 127.5)


def test_dynamic_per_token_uses_each_tokens_range():
    aq = ActQuantizer(QuantArgs(bit=8, symmetric=True, granularity="per_token"))
    x = torch.tensor([[1.0, 0.5], [100.0, 50.0]])
    out = aq(x)
    assert torch.allclose(out[0], x[0], atol=1 / 255) and torch.allclose(out[1], x[1], atol=100 / 255)


def test_static_percentile_ignores_rare_extremes():
    args = dict(bit=8, symmetric=False, granularity="per_tensor", static=True)
    x = torch.linspace(-1, 1, 10001).view(1, -1).clone()
    x[0, 5000] = 50.0  # one outlier token value
    ranges = {}
    for algo in ("minmax", "percentile"):
        aq = ActQuantizer(QuantArgs(**args, calib_algo=algo, percentile=99.9))
        aq.observing = True
        aq(x)
        aq(x * 0.5)
        aq.observing = False
        stats = {k: v for k, (v, op) in aq.observed_stats().items()}
        aq.finish_observation(stats)
        ranges[algo] = aq.scale.item() * 255
    assert ranges["minmax"] == pytest.approx(51.0, rel=1e-4)
    # mean over the two batches of the 0.1% / 99.9% values: (0.998 + 0.499) - (-0.998 - 0.499), /2 batches
    assert ranges["percentile"] == pytest.approx(1.497, rel=2e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_per_token_exact_values(symmetric):
    aq = ActQuantizer(QuantArgs(bit=4, symmetric=symmetric, granularity="per_token"))
    x = torch.tensor([[[0.7, -1.5, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4]]])
    out = aq(x)
    for row, got in zip(x[0], out[0]):
        if symmetric:  # grid -8..7, scale = absmax / 7.5
            scale = row.abs().max() / 7.5
            want = torch.clamp(torch.round(row / scale), -8, 7) * scale
        else:  # range widened to include 0, 15 steps, integer zero point
            lo, hi = min(row.min(), 0), max(row.max(), 0)
            scale = (hi - lo) / 15
            zero = torch.round(-8 - lo / scale)
            want = (torch.clamp(torch.round(row / scale) + zero, -8, 7) - zero) * scale
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_clip_ratio_scales_each_tokens_range_as_quarot(symmetric):
    """QuaRot's a_clip_ratio: each token's min/max times the ratio, then the usual grid; values beyond clip."""
    aq = ActQuantizer(QuantArgs(bit=4, symmetric=symmetric, granularity="per_token", clip_ratio=0.9))
    x = torch.tensor([[[0.7, -1.5, 3.0, 0.0], [0.1, 0.2, 0.3, -0.4]]])
    out = aq(x)
    for row, got in zip(x[0], out[0]):
        if symmetric:
            scale = 0.9 * row.abs().max() / 7.5
            want = torch.clamp(torch.round(row / scale), -8, 7) * scale
        else:
            lo, hi = min(0.9 * row.min(), 0), max(0.9 * row.max(), 0)
            scale = (hi - lo) / 15
            zero = torch.round(-8 - lo / scale)
            want = (torch.clamp(torch.round(row / scale) + zero, -8, 7) - zero) * scale
        assert torch.allclose(got, want, atol=1e-6)
    assert out[0, 0, 2] < 3.0 * 0.95  # the token's absmax is clipped
    static = ActQuantizer(QuantArgs(bit=8, symmetric=True, granularity="per_tensor", static=True, clip_ratio=0.5))
    static.observing = True
    static(torch.tensor([[1.0, -4.0]]))
    static.observing = False
    static.finish_observation({k: v for k, (v, op) in static.observed_stats().items()})
    assert static.scale.item() == pytest.approx(2.0 / 127.5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_dtype_float16_gives_scales_fp16_holds(symmetric):
    w = torch.randn(16, 64) * torch.logspace(-4, 1, 64)
    args = QuantArgs(bit=4, symmetric=symmetric, granularity="per_group", group_size=32, scale_dtype="float16",
                     calib_algo="mse")
    scale, zero = calibrate(grouped(w, args), args)
    assert torch.equal(scale, scale.half().float())
    plain = QuantArgs(bit=4, symmetric=symmetric, granularity="per_group", group_size=32, calib_algo="mse")
    assert not torch.equal(scale, calibrate(grouped(w, plain), plain)[0])  # the rounding did happen


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_straight_through_matches_autograd_of_the_expression(symmetric, x_grad):
    """OmniQuant trains through quant_dequant: its values and its gradients for x, scale and zero must be
    those of clamp(round_ste(x / scale) + zero) dequantized, with samples on both sides of the clamp."""
    torch.manual_seed(0)
    args = QuantArgs(bit=3, symmetric=symmetric, granularity="per_group", group_size=16, ste=True)
    x = (torch.randn(8, 16) * 2).requires_grad_(x_grad)
    scale = (torch.rand(8, 1) * 0.3 + 0.2).requires_grad_()  # small enough that some codes clamp
    zero = torch.zeros(8, 1) if symmetric else torch.randint(0, 8, (8, 1)).float().requires_grad_()
    g = torch.randn(8, 16)

    def reference():
        t = x / scale
        q = torch.clamp(t + (torch.round(t) - t).detach() + zero, args.qmin, args.qmax)
        return (q - zero) * scale

    leaves = [v for v in (x, scale, zero) if v.requires_grad]
    ref = reference()
    want = torch.autograd.grad(ref, leaves, g)
    got_out = quant_dequant(x, scale, zero, args)
    got = torch.autograd.grad(got_out, leaves, g)
    clamped = (torch.round(x / scale) + zero < args.qmin) | (torch.round(x / scale) + zero > args.qmax)
    assert clamped.any() and (~clamped).any()
    torch.testing.assert_close(got_out, ref, rtol=0, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- mse range search (GPTQ reference `find_params` / LLMC `get_mse_range`) ------------------------------
def _qdq(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bit: int, symmetric: bool) -> torch.Tensor:
    """Independent quantize-dequantize on llmc's signed grid [-2^(b-1), 2^(b-1)-1], float64, per row."""
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale


def _heavy_tailed_rows(seed=0, rows=24, cols=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] *= 12  # one outlier per row
    return w


def test_mse_tries_the_reference_candidates(monkeypatch):
    """maxshrink 0.8, grid 100: p = 1 - i/100 for i < 80 (down to 0.21 of the range), as GPTQ's reference."""
    import llmc.quant.quantizer as qz

    seen = []
    real = qz.qparams_from_range

    def spy(xmin, xmax, args):
        seen.append(xmax[0, 0].item())
        return real(xmin, xmax, args)

    monkeypatch.setattr(qz, "qparams_from_range", spy)
    x = torch.rand(3, 16)
    x[0, 0] = 1.0  # row 0's max: the recorded value is p itself
    calibrate(x, QuantArgs(bit=4, granularity="per_channel", calib_algo="mse", maxshrink=0.8, mse_grid=100))
    reference = [1 - i / 100 for i in range(int(0.8 * 100))]
    # the candidates in order, then the grid of the chosen one
    assert seen[:-1] == pytest.approx(reference, abs=1e-7)
    assert min(abs(seen[-1] - p) for p in reference) < 1e-7


@pytest.mark.parametrize("bit,symmetric,deep", [(2, False, True), (3, True, True), (4, False, False)])
def test_mse_range_equals_brute_force_search(bit, symmetric, deep):
    """The chosen scale of each row is the one of the shrink (from the reference's list) with the least
    sum |x - Q(x)|^2.4, first on ties, recomputed here with an independent quantizer."""
    w = _heavy_tailed_rows()
    args = QuantArgs(bit=bit, symmetric=symmetric, granularity="per_channel", calib_algo="mse")
    scale, zero = calibrate(grouped(w, args), args)
    x = w.double()
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    ps = [1 - i / 100 for i in range(80)]
    errs = torch.stack([(_qdq(x, p * lo, p * hi, bit, symmetric) - x).abs().pow(2.4).sum(1) for p in ps], 1)
    best = errs.argmin(1)
    if deep:  # some rows need a range below 0.8 of the full one (where the search used to stop)
        assert min(ps[i] for i in best) < 0.75
    for row in range(w.shape[0]):
        p = ps[best[row]]
        mine = _qdq(x[row:row + 1], p * lo[row:row + 1], p * hi[row:row + 1], bit, symmetric)
        got = dequantize(quantize(grouped(w, args)[row:row + 1], scale[row:row + 1], zero[row:row + 1], args),
                         scale[row:row + 1], zero[row:row + 1])
        assert torch.allclose(got.double(), mine, atol=1e-5), (row, p)


def test_mse_b_num_chunks_rows_with_the_same_result(monkeypatch):
    """mse_b_num (from the config) splits the rows: each candidate's quantized copy holds a third of
    them, and the parameters are those of one pass."""
    import llmc.quant.quantizer as qz
    from llmc.config.schema import QuantSpecCfg

    spec = QuantSpecCfg(bit=3, symmetric=False, granularity="per_group", group_size=16, calib_algo="mse", mse_b_num=3)
    chunked = QuantArgs.from_cfg(spec)
    assert chunked.mse_b_num == 3
    whole = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16, calib_algo="mse")
    w = _heavy_tailed_rows(1, rows=20, cols=64)  # 80 groups: chunks of 27, 27, 26
    rows_seen = []
    real = qz._err
    monkeypatch.setattr(qz, "_err", lambda xf, *a: rows_seen.append(xf.shape[0]) or real(xf, *a))
    one = calibrate(grouped(w, whole), whole)
    assert max(rows_seen) == 80
    rows_seen.clear()
    three = calibrate(grouped(w, chunked), chunked)
    assert max(rows_seen) == 27 and sorted(set(rows_seen)) == [26, 27]
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_mse_search_of_a_large_weight_picks_each_rows_least_error_range():
    """A weight over one search chunk (2^17 values) is searched a chunk of rows at a time in place; every
    row still gets the first candidate with the least float32 error, computed here candidate by candidate."""
    w = _heavy_tailed_rows(2, rows=2200, cols=64)
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=64, calib_algo="mse")
    scale, zero = calibrate(grouped(w, args), args)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    errs, grids = [], []
    for i in range(80):
        p = 1 - i / 100
        s = ((p * hi).clamp(min=0) - (p * lo).clamp(max=0)) / 7
        z = torch.clamp(torch.round(-4 - (p * lo).clamp(max=0) / s), -4, 3)
        fq = (torch.clamp(torch.round(w / s) + z, -4, 3) - z) * s
        errs.append((fq - w).abs().pow(2.4).sum(1))
        grids.append((s, z))
    best = torch.stack(errs, 1).argmin(1)  # first of equal minima
    want_scale = torch.stack([grids[b][0][r] for r, b in enumerate(best.tolist())])
    want_zero = torch.stack([grids[b][1][r] for r, b in enumerate(best.tolist())])
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)
