"""SpQR: outliers and quantized statistics against an independent computation on a layer whose Hessian is
diagonal (GPTQ then moves no error between columns, so every step can be written out per column), the bit
count, LLMC's config end to end on the tiny model, and the refusals."""
import math

import pytest
import torch

from llmc.algorithms.gptq import GPTQOptions, gptq_quantize
from llmc.algorithms.spqr import SpQRHook, SpQROptions
from llmc.cli import main
from llmc.quant.quantizer import QuantArgs

ROWS, COLS, GS, SGS, BIT, SBIT = 32, 48, 16, 16, 3, 3


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * 0.05
    W[torch.rand(ROWS, COLS, generator=g, dtype=torch.float64) < 0.02] *= 12  # planted outliers
    h = torch.rand(COLS, generator=g, dtype=torch.float64) * 3 + 0.5
    return W.float(), h


def _minmax(v, bit, widen):
    """Row-wise asymmetric grid on the signed range [-2^(b-1), 2^(b-1)-1], float zero point."""
    qmin, qmax = -2 ** (bit - 1), 2 ** (bit - 1) - 1
    lo, hi = v.min(dim=-1, keepdim=True).values, v.max(dim=-1, keepdim=True).values
    if widen:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = (hi - lo) / (qmax - qmin)
    z = qmin - lo / s
    return s, z, qmin, qmax


def _qdq(v, s, z, qmin, qmax):
    return (torch.clamp(torch.floor(v / s + z + 0.5), qmin, qmax) - z) * s


def _expected(W, h, rel, simplified):
    """SpQR's steps written out, float64, for H = diag(h): the factor of H⁻¹ is diag(1/sqrt(h + damp))."""
    W = W.double()
    d = 1 / torch.sqrt(h + 0.01 * h.mean())
    tau = rel * (W.var(dim=0) / d ** 2).mean().item()
    mask = torch.zeros(ROWS, COLS, dtype=torch.bool)
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    for g0 in range(0, COLS, GS):
        G, dg = W[:, g0:g0 + GS], d[g0:g0 + GS]
        if not simplified:
            s, z, lo, hi = _minmax(G, BIT, widen=False)
            base = (((_qdq(G, s, z, lo, hi) - G) / dg) ** 2).sum(dim=1, keepdim=True)
            gain = torch.empty_like(G)
            for j in range(GS):
                keep = [k for k in range(GS) if k != j]
                s, z, lo, hi = _minmax(G[:, keep], BIT, widen=False)
                gain[:, j] = base[:, 0] - (((_qdq(G[:, keep], s, z, lo, hi) - G[:, keep]) / dg[keep]) ** 2).sum(1)
            out = gain > tau
            mean = torch.stack([G[r, ~out[r]].mean() if (~out[r]).any() else torch.tensor(0.0, dtype=W.dtype)
                                for r in range(ROWS)])[:, None]
            G = torch.where(out, mean, G)
        s, z, qmin, qmax = _minmax(G, BIT, widen=True)  # the weight quantizer's grid (range includes 0)
        # statistics through their 3-bit quantizers, groups of SGS rows, ranges not widened
        stat = []
        for v in (s, z):
            vg = v.reshape(-1, SGS)
            ss, zz, lo, hi = _minmax(vg, SBIT, widen=False)
            stat.append(_qdq(vg, ss, zz, lo, hi).reshape(v.shape))
        s, z = stat
        scales.append(s)
        zeros.append(z)
        for c in range(g0, g0 + GS):
            q = _qdq(W[:, c:c + 1], s, z, qmin, qmax)[:, 0]
            mask[:, c] = ((W[:, c] - q) / d[c]) ** 2 > tau
            Q[:, c] = torch.where(mask[:, c], W[:, c], q)
    return Q, torch.cat(scales, 1), torch.cat(zeros, 1), mask


def _solve(W, h, rel, simplified, actorder=False):
    wargs = QuantArgs(bit=BIT, symmetric=False, granularity="per_group", group_size=GS, round_zp=False)
    stat = {"bit": SBIT, "symmetric": False, "granularity": "per_group", "group_size": SGS, "round_zp": False}
    opts = SpQROptions(relative_threshold=rel, simplified_outliers=simplified, scale=stat, zero=stat)
    hook = SpQRHook(opts, wargs, QuantArgs.from_cfg(opts.scale), QuantArgs.from_cfg(opts.zero))
    gopts = GPTQOptions(percdamp=0.01, actorder=actorder, blocksize=32)
    Q, scale, zero, g_idx = gptq_quantize(W, torch.diag(h).float(), wargs, gopts, "test", hook=hook)
    mask, bits = hook.result("test")
    return Q, scale, zero, g_idx, mask, bits


@pytest.mark.parametrize("simplified", [False, True])
def test_outliers_and_statistics_equal_an_independent_computation(simplified):
    W, h = _layer()
    Q, scale, zero, _, mask, bits = _solve(W, h, 0.2, simplified)
    eQ, escale, ezero, emask = _expected(W, h, 0.2, simplified)
    assert mask is not None and 0 < int(mask.sum()) < W.numel() // 10
    assert torch.equal(mask, emask)
    torch.testing.assert_close(scale.reshape(ROWS, -1).double(), escale, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(zero.reshape(ROWS, -1).double(), ezero, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Q.double(), eQ, rtol=1e-5, atol=1e-6)
    # the statistics really are on 3-bit grids: at most 8 distinct values per group of 16 rows
    for g in range(COLS // GS):
        for v in (scale.reshape(ROWS, -1)[:, g], zero.reshape(ROWS, -1)[:, g]):
            assert all(len(torch.unique(chunk)) <= 2 ** SBIT for chunk in v.reshape(-1, SGS))
    # bits: w bits + 3+3 per group and row + 16-bit scale and zero per second-level group + 32 per outlier
    groups = COLS // GS
    expect = W.numel() * BIT + groups * ROWS * (SBIT + SBIT) + groups * 32 * 2 * (ROWS // SGS) + 32 * int(emask.sum())
    assert bits == expect


def test_infinite_threshold_keeps_no_outlier_and_act_order_keeps_them_float():
    W, h = _layer(1)
    Q, *_, mask, _ = _solve(W, h, "inf", False)
    assert mask is None
    Q, _, _, g_idx, mask, _ = _solve(W, h, 0.2, False, actorder=True)
    assert g_idx is not None and mask is not None
    assert torch.equal(Q[mask], W[mask])  # the outliers are the float weights (no error moves with H diagonal)


def _spqr_config(make_config, wiki_files, tmp_path, special=None, weight=None, save=None, name="spqr.yml"):
    """llmc's equivalent of LLMC's methods/SpQR/spqr_w_only.yml (tiny model: groups of 16 as there)."""
    stat = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16, "round_zp": False}
    special = {"actorder": True, "percdamp": 1, "blocksize": 128, "true_sequential": True,
               "relative_threshold": 0.2, "simplified_outliers": False, "scale": stat, "zero": stat,
               **(special or {})}
    return make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 64,
                                  "bs": 4},
                        "eval": {"eval_pos": ["pretrain", "fake_quant"], "num_samples": 2},
                        "quant": {"method": "SpQR", "special": special, "quant_out": True,
                                  "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                             "group_size": 16, "round_zp": False, **(weight or {})}},
                        "save": {"save_path": str(tmp_path / "spqr"), **(save or {})}}, name=name)


def test_llmc_config_runs_end_to_end_and_reports_bits(make_config, wiki_files, tmp_path):
    import json

    from llmc.export.save import load_fake_quant

    path = _spqr_config(make_config, wiki_files, tmp_path, save={"save_fake": True})
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0
    results = json.loads((tmp_path / "spqr" / "results.json").read_text())
    ppl = [e["ppl"] for e in results["evals"] if e["pos"] == "fake_quant"][0]
    assert math.isfinite(ppl)
    # 4-bit weights, 3+3 bits of statistics per 16 weights, 2 x 32 bits per 16 x 16 weights of second-level
    # statistics, act order's 32-bit index per input column (tiny llama: q, k, v, o, gate, up, down), outliers
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    index = 32 * sum(i for _, i in shapes) / sum(o * i for o, i in shapes)
    floor = 4 + 6 / 16 + 64 / 256 + index
    assert floor < results["avg_bits"] < floor + 0.5, results["avg_bits"]
    assert "Average bits per weight" in (tmp_path / "spqr" / "results.md").read_text()
    model = load_fake_quant(tmp_path / "spqr" / "fake_quant_model")
    assert model is not None


@pytest.mark.parametrize("special, weight, save, words", [
    ({"relative_threshold": -1}, {}, {}, ["quant.special.relative_threshold", "-1"]),
    ({"tresh": 1}, {}, {}, ["tresh"]),
    ({}, {"symmetric": True, "round_zp": True}, {}, ["quant.weight.symmetric"]),
    ({}, {"round_zp": True}, {}, ["quant.weight.round_zp", "special.zero"]),
    ({}, {"granularity": "per_channel", "group_size": -1}, {}, ["quant.weight", "per_group"]),
    ({"scale": {"bit": 3, "granularity": "per_channel"}}, {}, {}, ["quant.special.scale.granularity"]),
    ({}, {}, {"save_gptq": True}, ["save.save_gptq", "save_fake"]),
])
def test_bad_settings_are_refused_before_loading(make_config, wiki_files, tmp_path, special, weight, save, words):
    from llmc.config.checks import check_config
    from llmc.config.loader import load_config
    from llmc.errors import ConfigError

    path = _spqr_config(make_config, wiki_files, tmp_path, special, weight, save)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(path))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_statistic_groups_must_divide_output_channels(make_config, wiki_files, tmp_path, capsys):
    stat = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 48, "round_zp": False}
    path = _spqr_config(make_config, wiki_files, tmp_path, {"scale": stat})
    assert main(["--config", path, "--dry-run"]) == 2
    assert "quant.special.scale.group_size" in capsys.readouterr().err
