"""Outlier Suppression+ and PiecewiseSearchSmooth against computations written here: the float model kept
by the shift and scale folds, OS+'s threshold search and PSS's piecewise search on a small layer redone by
brute force, and the shipped config on the tiny model."""
import copy
from pathlib import Path

import pytest
import torch
import yaml

from llmc.algorithms.osplus import OsPlus, OsPlusOptions
from llmc.algorithms.pss import PSS, PSSOptions, kmeans_1d
from llmc.cli import main
from llmc.quant.fake_linear import quant_disabled
from llmc.quant.quantizer import QuantArgs
from test_smoothquant import _batches, _run, qdq, qdq_rows
from tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
W8 = QuantArgs(bit=8, symmetric=True, granularity="per_channel")
A8 = QuantArgs(bit=8, symmetric=True, granularity="per_token")
W4 = QuantArgs(bit=4, symmetric=True, granularity="per_channel")
A4 = QuantArgs(bit=4, symmetric=True, granularity="per_token")


def planted(family):
    """Outlier channels (and, for OPT, off-centre channels) in every norm's output."""
    model = make_model(family)
    with torch.no_grad():
        for layer in (model.model.decoder.layers if family == "opt" else model.model.layers):
            for i, norm in enumerate(m for m in layer.children() if "LayerNorm" in type(m).__name__
                                     or "RMSNorm" in type(m).__name__):
                norm.weight[[3, 17 + i, 40]] *= 30
                if family == "opt":
                    norm.bias[[5, 21, 50 - i]] += torch.tensor([6.0, -4.0, 3.0])
    return model


def per_token(x, bits):
    return qdq(x, x.abs().amax(-1, keepdim=True), bits)


@pytest.mark.parametrize("family, algo", [
    ("llama", OsPlus(W8, A8, OsPlusOptions(true_sequential=True, smooth_all=True, search_batches=1))),
    ("opt", OsPlus(W8, A8, OsPlusOptions())),
    ("llama", PSS(W8, A8, PSSOptions(k_piece=2, search_alpha_max=0.4))),
    ("opt", PSS(W8, A8, PSSOptions(k_piece=2, search_alpha_max=0.4, true_sequential=True))),
])
def test_shift_and_scale_keep_the_float_model(family, algo):
    model = planted(family)
    original = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    _run(model, algo)
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    changed = {n for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters())
               if not torch.equal(p, q)}
    norms = {n for n in changed if "norm" in n}
    assert any(n.endswith("weight") for n in norms)  # scales folded into the norms
    if family == "opt":  # the shift: into the LayerNorm biases and the biases of the linears behind them
        assert {"model.decoder.layers.0.self_attn_layer_norm.bias", "model.decoder.layers.0.fc1.bias"} <= changed
    else:  # RMSNorm has no bias: scale only, and no bias appears anywhere
        assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    if algo.options.smooth_all and family == "llama":  # o_proj's scale folded into v_proj's rows (GQA)
        assert "model.layers.1.self_attn.v_proj.weight" in changed


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_other_layouts_keep_the_float_model(family):
    """Biased q/k/v behind an RMSNorm (no shift: the norm has no bias), Gemma's (1 + w) norm, fused
    qkv_proj / gate_up_proj."""
    model = make_model(family)
    original = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    _run(model, OsPlus(W8, A8, OsPlusOptions(smooth_all=True, search_batches=1)))
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters())
               if not torch.equal(p, q)]
    assert any("norm" in n for n in changed), changed  # something was folded


def _fc1_setup(algo):
    """OPT block 0's fc1 (prev_op final_layer_norm, inspect fc1: a single linear): its float inputs, the
    reference norm and fc1, and the model after `algo` ran with float block inputs (quant_out False)."""
    model = planted("opt")
    original = copy.deepcopy(model)
    batches = _batches(model)
    xs = []
    h = original.model.decoder.layers[0].fc1.register_forward_hook(lambda m, a, o: xs.append(a[0].detach()))
    with torch.no_grad():
        for ids in batches:
            original(ids, use_cache=False)
    h.remove()
    _run(model, algo, batches, quant_out=False)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    ref, got = original.model.decoder.layers[0], model.model.decoder.layers[0]
    return x, ref, got


def _check_folds(ref, got, s, z):
    """LayerNorm: weight / s, (bias - z) / s; fc1: columns times s, bias + W z."""
    w, b = ref.fc1.weight, ref.fc1.bias
    torch.testing.assert_close(got.final_layer_norm.weight, ref.final_layer_norm.weight / s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.final_layer_norm.bias, (ref.final_layer_norm.bias - z) / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.fc1.weight, w * s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.fc1.bias, b + w @ z, rtol=1e-5, atol=1e-5)


def test_osplus_threshold_search_is_the_brute_force_minimum():
    """z = (max + min) / 2 per channel; s = max(1, max|x - z| / t) for t on LLMC's grid (largest centred
    value down to 1 in max(100, amax / 0.5) steps); the t whose W4A4 fc1 output error is least."""
    x, ref, got = _fc1_setup(OsPlus(W4, A4, OsPlusOptions()))
    w, b = ref.fc1.weight, ref.fc1.bias
    z = (x.amax(0) + x.amin(0)) / 2
    c = x - z
    amax, top = max(c.max().item(), 0), max(c.max().item(), -c.min().item())
    n = max(100, int(amax / 0.5))
    grid = [top - i * (top - 1) / n for i in range(n + 1)]
    with torch.no_grad():
        ref_out = x @ w.T + b
        cands = [torch.clamp(c.abs().amax(0) / t, min=1) for t in grid]
        losses = [(per_token(c / s, 4) @ qdq_rows(w * s, 4).T + b + w @ z - ref_out).pow(2).mean().item()
                  for s in cands]
    assert max(losses) > 1.5 * min(losses)  # the threshold matters here
    s = (got.fc1.weight.detach() / w.detach())[0]
    picked = [i for i, cand in enumerate(cands) if torch.allclose(cand, s, rtol=1e-5)]
    assert picked, "the folded scale is no candidate of the grid"
    assert losses[picked[0]] <= min(losses) * (1 + 1e-5), (picked, min(range(len(losses)), key=losses.__getitem__))
    assert (s > 1).any() and (s == 1).any()  # only the channels past the threshold are squeezed
    _check_folds(ref, got, s, z)


def test_pss_piecewise_search_is_the_brute_force_greedy_minimum():
    """Pieces by magnitude of the centred absmax (the planted outliers apart from the rest); per piece, in
    ascending order, the alpha (s = |x|max^a / |W|max^(1-a)) or constant scale of least linear-output error,
    Q_a((x - z)/s) Q_w(W s)^T against (x - z) W^T, with the other pieces at their found or unit scale."""
    opts = PSSOptions(k_piece=2, search_alpha_min=0.3, search_alpha_max=0.5, search_scale_min=1.0,
                      search_scale_max=3.0, smooth_all=False)  # fc1's rows keep fc2's scale out
    x, ref, got = _fc1_setup(PSS(W4, A4, opts))
    w = ref.fc1.weight.detach()
    z = (x.amax(0) + x.amin(0)) / 2
    c = x - z
    xa, wa = c.abs().amax(0), w.abs().amax(0)
    big = xa > 0.5 * xa.max()
    pieces = [torch.nonzero(~big).flatten(), torch.nonzero(big).flatten()]
    assert 0 < len(pieces[1]) < 8
    alphas = [0.3 + 0.01 * i for i in range(21)]
    values = [("a", a) for a in alphas] + [("c", v) for v in (1.0, 1.5, 2.0, 2.5, 3.0)]

    def loss(s):
        return (per_token(c / s, 4) @ qdq_rows(w * s, 4).T - c @ w.T).pow(2).mean().item()

    s = torch.ones_like(xa)
    with torch.no_grad():
        for piece in pieces:
            best = None
            for kind, v in values:
                trial = s.clone()
                trial[piece] = (xa.pow(v) / wa.pow(1 - v))[piece] if kind == "a" else v
                cur = loss(trial)
                if best is None or cur <= best[0]:
                    best = (cur, trial)
            s = best[1]
        found = (got.fc1.weight.detach() / w)[0]
        assert loss(found) <= loss(s) * (1 + 1e-5)
        assert loss(found) < 0.9 * loss(torch.ones_like(xa))
    torch.testing.assert_close(found, s, rtol=1e-4, atol=0)
    _check_folds(ref, got, found, z)


def test_planted_outliers_osplus_and_pss_beat_rtn():
    """Outlier channels in the norms: migrating them into the weights cuts q_proj's W8A6 output error."""
    from llmc.algorithms.base import Options
    from llmc.algorithms.rtn import RTN
    from test_smoothquant import _planted, _q_proj_error

    base = _planted()
    ids = torch.randint(0, base.config.vocab_size, (2, 24))
    a6 = QuantArgs(bit=6, symmetric=True, granularity="per_token")
    rtn = _q_proj_error(copy.deepcopy(base), RTN(W8, a6, Options()), ids)
    assert _q_proj_error(copy.deepcopy(base), OsPlus(W8, a6, OsPlusOptions()), ids) < 0.2 * rtn
    assert _q_proj_error(copy.deepcopy(base), PSS(W8, a6, PSSOptions(k_piece=2)), ids) < 0.2 * rtn


def test_kmeans_pieces_follow_the_magnitude_clusters():
    v = torch.tensor([0.9, 1.1, 50.0, 1.0, 10.0, 11.0, 52.0, 9.5])
    pieces = [sorted(p.tolist()) for p in kmeans_1d(v, 3)]
    assert pieces == [[0, 1, 3], [4, 5, 7], [2, 6]]
    assert [p.tolist() for p in kmeans_1d(v, 1)] == [list(range(8))]


# ---- config and CLI --------------------------------------------------------------------------------
CONFIG = ROOT / "configs/quantization/methods/OsPlus/osplus_w_a.yml"


def test_shipped_config_dry_run_and_end_to_end_on_the_tiny_model(tiny_dir, wiki_files, tmp_path, capsys):
    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["quant"]["method"] == "OsPlus" and raw["quant"]["special"]["true_sequential"] is True
    sets = [f"model.path={tiny_dir('llama')}", f"calib.path={wiki_files['valid']}", "calib.n_samples=4",
            "calib.seq_len=32", f"eval.path={wiki_files['test']}", "eval.seq_len=64", "eval.num_samples=2",
            f"save.save_path={tmp_path / 'out'}", "save.save_trans=True"]
    args = ["--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]
    assert main(args + ["--dry-run"]) == 0
    assert "OsPlus" in capsys.readouterr().out
    assert main(args) == 0
    evals = {e["pos"]: e["ppl"] for e in yaml.safe_load((tmp_path / "out" / "results.json").read_text())["evals"]}
    assert evals["transformed"] == pytest.approx(evals["pretrain"], rel=1e-4)
    assert evals["fake_quant"] < 1.5 * evals["pretrain"]


def test_pss_end_to_end_with_shift_on_opt(make_config, wiki_files, tmp_path):
    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
        "quant": {"method": "PSS",
                  "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                  "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True},
                  "special": {"k_piece": 2, "search_alpha_max": 0.3, "search_scale_max": 2.0}},
        "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant"]},
        "save": {"save_trans": True},
    }, family="opt")
    assert main(["--config", path]) == 0
    evals = {e["pos"]: e["ppl"] for e in yaml.safe_load((tmp_path / "out" / "results.json").read_text())["evals"]}
    assert evals["transformed"] == pytest.approx(evals["pretrain"], rel=1e-4)
    assert evals["fake_quant"] < 1.5 * evals["pretrain"]


@pytest.mark.parametrize("method, special, act, words", [
    ("OsPlus", {"alpha": 0.5}, True, ["quant.special.alpha"]),
    ("OsPlus", {"search_batches": 0}, True, ["quant.special.search_batches: 0", ">= 1"]),
    ("OsPlus", {}, False, ["quant.act", "required"]),
    ("PSS", {"k_piece": 0}, True, ["quant.special.k_piece: 0", ">= 1"]),
    ("PSS", {"search_alpha_max": 1.5}, True, ["quant.special.search_alpha_min", "1.5"]),
    ("PSS", {"search_scale_max": None}, True, ["quant.special.search_scale_max", "together"]),
    ("PSS", {"search_scale_min": 0}, True, ["quant.special.search_scale_min", "0 < search_scale_min"]),
])
def test_bad_options_are_refused_before_loading(make_config, wiki_files, capsys, method, special, act, words):
    quant = {"method": method, "special": special,
             "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}}
    if act:
        quant["act"] = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    path = make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32},
                        "quant": quant})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
