"""`act.calib_algo: static_hist` (LLMC's histogram search for static per-tensor activation ranges), against
a histogram merge and threshold search written here in NumPy."""
import json

import numpy as np
import pytest
import torch

from llmc.cli import main
from llmc.quant.fake_linear import ActQuantizer
from llmc.quant.quantizer import QuantArgs

BINS, SUB = 2048, 16


def merged_histogram(batches):
    """Running histogram over the running [lo, hi]; when the range grows, each old bin's mass is split into 16
    equal parts, each landing in the new bin that holds its midpoint."""
    hist = lo = hi = None
    for x in batches:
        x = x.numpy().astype(np.float32).ravel()
        if hist is None:
            lo, hi = x.min(), x.max()
            hist = torch.histc(torch.from_numpy(x), BINS, min=float(lo), max=float(hi)).numpy()
            continue
        nlo, nhi = min(lo, x.min()), max(hi, x.max())
        new = torch.histc(torch.from_numpy(x), BINS, min=float(nlo), max=float(nhi)).numpy()
        if (nlo, nhi) != (lo, hi):
            mids = (np.linspace(lo, hi, BINS * SUB + 1, dtype=np.float32)[:-1]
                    + np.float32(0.5) * np.float32((hi - lo) / (BINS * SUB)))
            edges = np.linspace(nlo, nhi, BINS + 1, dtype=np.float32)
            idx = np.clip(np.searchsorted(edges, mids, side="right") - 1, 0, BINS - 1)
            hist = np.bincount(idx, weights=np.repeat(hist, SUB) / SUB, minlength=BINS).astype(np.float32) + new
        else:
            hist = hist + new
        lo, hi = nlo, nhi
    return hist.astype(np.float32), lo, hi


def l2_error(hist, lo, hi, start, end, levels):
    """PyTorch HistogramObserver's error of putting bins start..end onto `levels` uniform levels."""
    w = (float(hi) - float(lo)) / BINS
    dw = w * (end - start + 1) / levels
    b0 = ((np.arange(BINS) - start) * w).astype(np.float32)
    b1 = b0 + np.float32(w)
    d0 = np.clip(np.floor(b0 / np.float32(dw)), 0, levels - 1)
    d1 = np.clip(np.floor(b1 / np.float32(dw)), 0, levels - 1)
    rho = hist / np.float32(w)
    cube = lambda a, b: rho * (b ** 3 - a ** 3) / 3  # noqa: E731
    h = np.float32(dw / 2)
    total = cube(b0 - (d0 + 0.5) * np.float32(dw), np.full(BINS, h, np.float32))
    total = total + (d1 - d0 - 1) * cube(np.float32(-h), h)
    total = total + cube(np.float32(-h), b1 - (d1 * np.float32(dw) + h))
    return float(total.astype(np.float32).sum())


def searched_range(hist, lo, hi, bits):
    cs, n = np.cumsum(hist, dtype=np.float32), float(hist.sum())
    alpha, beta, s, e, best = 0.0, 1.0, 0, BINS - 1, float("inf")
    while alpha < beta:
        na, nb = alpha + 1e-8, beta - 1e-8
        left = s
        while left < e and cs[left] < np.float32(na * n):
            left += 1
        right = e
        while right > s and cs[right] > np.float32(nb * n):
            right -= 1
        ns, ne = (left, e) if left - s > e - right else (s, right)
        if left - s > e - right:
            alpha = na
        else:
            beta = nb
        if (ns, ne) == (s, e):
            continue
        err = l2_error(hist, lo, hi, ns, ne, 2 ** bits)
        if err > best:
            break
        best, s, e = err, ns, ne
    w = (hi - lo) / BINS
    return lo + w * s, lo + w * (e + 1)


@pytest.mark.parametrize("bits", [4, 8])
def test_static_hist_range_equals_an_independent_search(bits):
    torch.manual_seed(0)
    batches = [torch.randn(2, 16, 32) for _ in range(3)]
    batches[1][0, 3, 5] = 9.0  # an outlier that widens the range (the running histogram is re-spread)
    batches[2][1, 7, 2] = -6.0
    args = QuantArgs(bit=bits, symmetric=True, granularity="per_tensor", static=True, calib_algo="static_hist")
    q = ActQuantizer(args)
    q.observing = True
    for x in batches:
        q(x)
    q.observing = False
    stats = q.observed_stats()
    q.finish_observation({k: v for k, (v, _) in stats.items()})
    lo, hi = searched_range(*merged_histogram(batches), bits)
    absmax = max(abs(lo), abs(hi))
    assert q.scale.item() == pytest.approx(absmax / ((2 ** bits - 1) / 2), rel=1e-6)
    assert absmax < 9.0  # the search narrows the range (minmax gives the outlier, 9)
    if bits == 4:
        assert hi < 4.5  # at 16 levels it gives up the outlier's sparse tail


def test_static_hist_end_to_end_and_reload(make_config, tmp_path, wiki_files):
    from llmc.export.save import load_fake_quant
    from test_rtn_cli import _ppl

    path = make_config({"quant": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                                  "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True,
                                          "calib_algo": "static_hist"}},
                        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
                        "eval": {"eval_pos": ["fake_quant"]}, "save": {"save_fake": True}})
    assert main(["--config", path]) == 0
    ppl = json.loads((tmp_path / "out" / "results.json").read_text())["evals"][0]["ppl"]
    assert _ppl(load_fake_quant(tmp_path / "out" / "fake_quant_model"), wiki_files["test"]) == pytest.approx(ppl, rel=1e-5)


def test_static_hist_asymmetric_is_refused(make_config, capsys, wiki_files):
    path = make_config({"quant": {"act": {"bit": 8, "symmetric": False, "granularity": "per_tensor", "static": True,
                                          "calib_algo": "static_hist"}},
                        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32}})
    assert main(["--config", path]) == 2
    assert "quant.act.calib_algo" in capsys.readouterr().err
