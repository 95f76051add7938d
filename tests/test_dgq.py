"""DGQ (llmc/algorithms/dgq.py): each search step against a row-by-row computation written here from LLMC's
algorithm, the grid's two-level structure, the smoothing, the config keys, and LLMC's dgq_w_a equivalent end to end."""
import pytest
import torch

from llmc.algorithms.dgq import channel_search, dgq_grid, group_search, percentile_scales
from llmc.cli import main
from llmc.quant.quantizer import QuantArgs, fake_quant

PLAIN = ("bit", "symmetric", "granularity", "group_size")
W12 = {"w_1": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32},
       "w_2": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}


def q4_row(v: torch.Tensor):
    """4-bit asymmetric (LLMC: codes [0, 15], range not widened to 0) of one row: scale, zero, fake values."""
    s = max(float(v.max() - v.min()), 1e-5) / 15
    z = min(max(-round(float(v.min()) / s), 0), 15)
    return s, z, (torch.clamp(torch.round(v / s) + z, 0, 15) - z) * s


def layer(seed=0, out=6, cols=64, tokens=40):
    torch.manual_seed(seed)
    w = torch.randn(out, cols) * torch.linspace(0.2, 2, cols)
    xs = [torch.randn(tokens, cols), torch.randn(tokens // 2, cols)]
    xs[0][:, 3] *= 20  # an outlier channel
    return w, xs


def test_group_search_is_the_least_error_clip_per_row():
    w, xs = layer()
    act = QuantArgs(bit=8, granularity="per_token")
    xqs = [fake_quant(x, act) for x in xs]
    scales, zeros = group_search(xs, xqs, w, 32)
    for r in range(w.shape[0]):
        for j in range(2):
            cols = slice(32 * j, 32 * j + 32)
            v, lo, hi = w[r, cols].clone(), w[r, cols].min(), w[r, cols].max()
            best = None
            for i in range(20):  # the clip accumulates: each ratio clips the already clipped row
                ratio = 1.02 - (i + 1) / 20 * 0.22
                v = v.clamp(float(lo * ratio), float(hi * ratio))
                s, z, fq = q4_row(v)
                err = sum(float((x[:, cols] @ w[r, cols] - xq[:, cols] @ fq).pow(2).sum())
                          for x, xq in zip(xs, xqs))
                if best is None or err < best[0] * (1 - 1e-6):
                    best = (err, s, z)
            assert scales[r, j].item() == pytest.approx(best[1], rel=1e-5), (r, j)
            assert zeros[r, j].item() == best[2], (r, j)


def test_channel_search_and_grid_by_hand():
    w, xs = layer(1)
    scales, zeros = group_search(xs, xs, w, 32)
    s8 = channel_search(xs, xs, w, scales, zeros, 32)
    for r in range(w.shape[0]):
        best = None
        for i in range(80):
            ratio = 1.02 - (i + 1) / 80 * 0.82
            c = float(w[r].abs().max()) * ratio
            cand = max(float(w[r].clamp(-c, c).abs().max()), 1e-5) / 127
            fq = torch.empty(64)
            for j in range(2):
                k = max(round(float(scales[r, j]) / cand), 1)
                z = float(zeros[r, j])
                cols = slice(32 * j, 32 * j + 32)
                fq[cols] = (torch.clamp(torch.round(w[r, cols] / (k * cand)) + z, 0, 15) - z) * (k * cand)
            err = sum(float((x @ w[r] - x @ fq).pow(2).sum()) for x in xs)
            if best is None or err < best[0] * (1 - 1e-6):
                best = (err, cand)
        assert s8[r].item() == pytest.approx(best[1], rel=1e-5), r
    # the grid: integer group scales k >= 1 over s8, codes within k·|code - zero| <= 127 (+ rounding of 127/k)
    k = torch.round(scales / s8.view(-1, 1)).clamp(min=1)
    codes, scale, zero = dgq_grid(w, k, zeros, s8, 32)
    fake = ((codes - zero) * scale).reshape(w.shape)
    int8 = fake / s8.view(-1, 1)
    assert torch.allclose(int8, torch.round(int8), atol=1e-3)
    assert int8.abs().max() <= 127 + k.max() / 2
    assert codes.min() >= 0 and codes.max() <= 15
    for r in range(w.shape[0]):
        for j in range(2):
            kk, z = int(k[r, j]), float(zeros[r, j])
            m = round(127 / kk)
            lo, hi = max(0, z - m), min(15, z + m)
            step = kk * float(s8[r])
            want = (torch.clamp(torch.round(w[r, 32 * j:32 * j + 32] / step) + z, lo, hi) - z) * step
            torch.testing.assert_close(fake[r, 32 * j:32 * j + 32], want, rtol=1e-6, atol=0)


def test_percentile_scales_lift_only_the_top_channels():
    s = torch.linspace(0.1, 1.0, 400)
    s[7], s[100] = 50.0, 20.0
    got = percentile_scales(s)
    b = sorted(s.tolist())[-int(400 * 0.005 + 1.5)]  # the 3rd largest: 1.0
    assert b == pytest.approx(1.0)
    want = torch.where(s > b, s / b, torch.ones_like(s))
    assert torch.equal(got, want) and (got > 1).sum() == 2
    assert percentile_scales(torch.full((10,), 1e-6)) is None


def test_dgq_runs_end_to_end_and_keeps_the_float_model(make_config, tmp_path, wiki_files, DELETE):
    """LLMC's dgq_w_a equivalent: dry-run, then a run whose smoothed float model (transformed) computes the
    original's perplexity and whose fake-quant model stays close to it."""
    from conftest import read_results

    out = tmp_path / "out"
    path = make_config({
        "calib": {"name": "wikitext2", "download": False, "path": wiki_files["valid"], "n_samples": 2, "bs": 1,
                  "seq_len": 32, "preproc": "wikitext2_gptq", "seed": 0},
        "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant"], "num_samples": 2},
        "quant": {"method": "DGQ", "weight": {**{k: DELETE for k in PLAIN}, **W12},
                  "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}},
        "save": {"save_path": str(out)}})
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0
    ppl = {e["pos"]: e["ppl"] for e in read_results(out / "results.json")["evals"]}
    assert ppl["transformed"] == pytest.approx(ppl["pretrain"], rel=1e-4)
    assert ppl["pretrain"] < ppl["fake_quant"] < 1.2 * ppl["pretrain"]


@pytest.mark.parametrize("weight,act,words", [
    ({"w_1": {**W12["w_1"], "symmetric": True}, "w_2": W12["w_2"]}, None, ["quant.weight.w_1", "asymmetric"]),
    ({"w_1": W12["w_1"], "w_2": {"bit": 4, "symmetric": True, "granularity": "per_channel"}}, None,
     ["quant.weight.w_2", "int8"]),
    ({"w_1": W12["w_1"]}, None, ["quant.weight", "w_2"]),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}, None, ["quant.weight", "w_1"]),
    ({**W12, "bit": 4}, None, ["quant.weight", "w_1/w_2"]),
    (W12, {"bit": 8, "static": True, "granularity": "per_tensor"}, ["quant.act", "dynamic"]),
    ({"w_1": {**W12["w_1"], "group_size": 48}, "w_2": W12["w_2"]}, None, ["quant.weight.w_1.group_size", "48"]),
])
def test_bad_dgq_settings_are_config_errors(make_config, wiki_files, capsys, DELETE, weight, act, words):
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 2, "seq_len": 32}
    path = make_config({"calib": calib, "quant": {"method": "DGQ", "weight": {**{k: DELETE for k in PLAIN}, **weight},
                                                  **({"act": act} if act else {})}})
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_dgq_packed_export_refused_before_loading(make_config, wiki_files, tmp_path, capsys, DELETE):
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 2, "seq_len": 32}
    out = tmp_path / "out"
    path = make_config({"calib": calib, "quant": {"method": "DGQ", "weight": {**{k: DELETE for k in PLAIN}, **W12}},
                        "save": {"save_autoawq": True, "save_path": str(out)}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "save.save_autoawq" in err and "two-level" in err, err
    assert not out.exists()
