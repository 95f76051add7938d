import copy
import json

import pytest
import torch

from llmc.algorithms.awq import Awq, AwqOptions
from llmc.algorithms.equivalence import gram_loss
from llmc.algorithms.rtn import RTN
from llmc.algorithms.base import Options
from llmc.cli import main
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.errors import UserError
from llmc.export.state import architecture_fingerprint, load_state
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import quant_disabled
from llmc.quant.quantizer import QuantArgs, fake_quant
from tiny import FAMILIES, make_model

W3 = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32)


def _batches(model, n=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, model.config.vocab_size, (2, 32), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_scaling_alone_keeps_the_float_model(family, version):
    model = make_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    adapter = adapter_class(model.config.model_type, None)(model)
    algo = Awq(W3, None, AwqOptions(weight_clip=False, trans_version=version))
    state = quantize_blocks(model, adapter, algo, _batches(model), set(), RunContext(), quant_out=True)
    scales = state["scales"]
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())  # something was folded
    if family != "opt":  # v→o through GQA (2 kv heads, 4 query heads) folds too
        assert "model.layers.0.self_attn.o_proj" in scales
    with torch.no_grad(), quant_disabled(model):
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_scales_protect_planted_outlier_channels():
    """Channels with 30x larger activations: AWQ's block output error under W3 is well below RTN's."""
    base = make_model("llama")
    with torch.no_grad():
        for layer in base.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 30
            layer.post_attention_layernorm.weight[[5, 22]] *= 30
    errs = {}
    for name, algo in [("rtn", RTN(W3, None, Options())),
                       ("awq", Awq(W3, None, AwqOptions(weight_clip=False)))]:
        model = copy.deepcopy(base)
        adapter = adapter_class("llama", None)(model)
        batches = _batches(model, 3)
        with torch.no_grad():
            ref = model(batches[0]).logits
        quantize_blocks(model, adapter, algo, batches, set(), RunContext(), quant_out=True)
        with torch.no_grad():
            errs[name] = (model(batches[0]).logits - ref).pow(2).mean().item()
    assert errs["awq"] < 0.7 * errs["rtn"]


# ---- independent references (no llmc quantizer code) -------------------------------------------------
def _qdq_rows(x: torch.Tensor, bit: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize each row over its own range on llmc's signed grid [-2^(b-1), 2^(b-1)-1], in x's
    dtype: callers pass float32, as llmc computes grids, because a clip to [-m, m] puts the asymmetric zero
    point exactly on a rounding tie (round(-0.5)) that float64 would break differently."""
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale, zero = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale


def _w3(w: torch.Tensor) -> torch.Tensor:
    """W3 (asymmetric, groups of 32 along the inputs), as the `W3` args."""
    return _qdq_rows(w.reshape(-1, 32), 3, False).reshape(w.shape)


def _inputs_of(model, name: str, batches) -> torch.Tensor:
    """The float model's inputs to one linear, all calibration tokens as rows."""
    xs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, inp: xs.append(inp[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _autoawq_clip(w: torch.Tensor, x: torch.Tensor, qdq, sym: bool, xq=None, grid=20, max_shrink=0.5):
    """AutoAWQ's auto_clip: per output row and group of 32, the range [-m, m] (sym, m = max|w|) or
    [min, max] shrunk by 1 - i/grid, i < max_shrink·grid, with the least mean squared partial-output error
    on the tokens x (the candidate seeing xq, quantized inputs, when given). Returns (lo, hi) [rows, groups]."""
    w = w.float()
    xq = (x if xq is None else xq).double()
    rows, groups = w.shape[0], w.shape[1] // 32
    wg = w.view(rows, groups, 32)
    top = wg.abs().amax(-1) if sym else wg.amax(-1)
    bottom = -top if sym else wg.amin(-1)
    lo, hi = bottom.clone(), top.clone()
    best = torch.full(top.shape, float("inf"), dtype=torch.float64)
    ref = torch.einsum("tgk,rgk->trg", x.double().view(-1, groups, 32), wg.double())
    for i in range(int(max_shrink * grid)):
        t, b = top * (1 - i / grid), bottom * (1 - i / grid)
        q = qdq(torch.clamp(wg, b.unsqueeze(-1), t.unsqueeze(-1)).reshape(-1, 32)).view(rows, groups, 32)
        err = (torch.einsum("tgk,rgk->trg", xq.view(-1, groups, 32), q.double()) - ref).pow(2).mean(0)
        better = err < best
        best, lo, hi = torch.where(better, err, best), torch.where(better, b, lo), torch.where(better, t, hi)
    return lo, hi


def test_clip_search_lowers_output_error_and_matches_autoawq():
    """Default clipping is AutoAWQ's (symmetric, ±max|w| shrunk), found per group on the calibration
    tokens; the clipped W3 down_proj's output error on those tokens is well below unclipped W3's."""
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::16] *= 6  # heavy-tailed groups: clipping pays off
    batches = _batches(model)
    x = _inputs_of(model, "model.layers.0.mlp.down_proj", batches)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    algo = Awq(W3, None, AwqOptions(trans=False, weight_clip=True))
    state = quantize_blocks(model, adapter, algo, batches, set(), RunContext(), quant_out=True)
    assert "model.layers.0.self_attn.q_proj.max" not in state["clips"]  # attention-score layers are not clipped
    lo, hi = state["clips"]["model.layers.0.mlp.down_proj.min"], state["clips"]["model.layers.0.mlp.down_proj.max"]
    want_lo, want_hi = _autoawq_clip(w, x, lambda t: _qdq_rows(t, 3, False), sym=True)
    torch.testing.assert_close(hi, want_hi, rtol=0, atol=0)
    torch.testing.assert_close(lo, want_lo, rtol=0, atol=0)
    with torch.no_grad():
        clipped = (model.model.layers[0].mlp.down_proj(x) - x @ w.T).pow(2).mean()
    unclipped = (x @ _w3(w).T - x @ w.T).pow(2).mean()
    assert clipped < 0.9 * unclipped, (clipped, unclipped)


A4 = QuantArgs(bit=4, symmetric=False, granularity="per_token")  # LLMC's W4A4 step 1


@pytest.mark.parametrize("clip_sym", [True, False])
@pytest.mark.parametrize("aargs", [None, A4], ids=["w-only", "a4"])
def test_clip_search_picks_the_per_group_best_shrink(clip_sym, aargs):
    """Each group's chosen range is the grid point with the least error of that group's partial output,
    with quantized inputs (each token over its full width) when activations are quantized, as LLMC."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 10, bias=False)
    linear.weight.data[:, ::7] *= 5
    x = torch.randn(1, 40, 64)
    x[..., 3] *= 8  # an outlier channel: A4 rounds the others coarsely
    w = linear.weight.data.clone()
    lo, hi = Awq(W3, aargs, AwqOptions(clip_sym=clip_sym))._clip(linear, [x])
    xs = x.reshape(-1, 64)
    xq = None if aargs is None else _qdq_rows(xs, 4, False)
    want_lo, want_hi = _autoawq_clip(w, xs, lambda t: _qdq_rows(t, 3, False), clip_sym, xq)
    torch.testing.assert_close(hi, want_hi, rtol=0, atol=0)
    torch.testing.assert_close(lo, want_lo, rtol=0, atol=0)
    if aargs is not None:  # the case is built so quantized inputs change some choices
        assert not torch.allclose(want_hi, _autoawq_clip(w, xs, lambda t: _qdq_rows(t, 3, False), clip_sym)[1])


def _one_block_llama(outlier_gain: float) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        model.model.layers[0].mlp.up_proj.weight[[5, 40, 77]] *= outlier_gain  # salient down_proj inputs
    return model


def _paper_awq_scales(x: torch.Tensor, w: torch.Tensor, wq, aq=None, n_grid=20):
    """AWQ's search (the paper, eq. 4-5; LLMC's v2): s = mean|x|^r per input channel, normalised by
    sqrt(max(s)·min(s)), r on a grid of n_grid in [0, 1); the loss is the mean squared error of
    Q(W s)·(x/s) (x/s quantized by aq when given) against W x. Returns (scales, losses) per r."""
    ref = x.double() @ w.double().T
    scales, losses = [], []
    for r in range(n_grid):
        s = x.abs().mean(0).pow(r / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        xin = x / s if aq is None else aq(x / s)
        scales.append(s)
        losses.append((xin.double() @ wq(w * s).double().T - ref).pow(2).mean().item())
    return scales, losses


@pytest.mark.parametrize("aargs", [None, A4], ids=["w-only", "a4"])
def test_scale_search_follows_the_paper(aargs, monkeypatch):
    """down_proj's searched scale and the loss of every ratio, against the paper's search written here;
    with an act section the scaled input is quantized too (LLMC's W4A4 step 1), which moves the choice."""
    import llmc.algorithms.awq as awq_mod

    model = _one_block_llama(30.0)
    down = model.model.layers[0].mlp.down_proj
    batches = _batches(model)
    x = _inputs_of(model, "model.layers.0.mlp.down_proj", batches)
    w4 = QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32)
    wq = lambda t: _qdq_rows(t.reshape(-1, 32), 4, False).reshape(t.shape)  # noqa: E731
    aq = None if aargs is None else (lambda t: _qdq_rows(t, 4, False))
    scales, losses = _paper_awq_scales(x, down.weight.detach(), wq, aq)

    seen = []  # every loss llmc computes for down_proj's candidates
    real_forward, real_gram = awq_mod.forward_loss, awq_mod.gram_loss

    def spy(loss_of, mine):
        return lambda *a: (lambda v: (seen.append(v) if mine else None, v)[1])(loss_of(*a))

    monkeypatch.setattr(awq_mod, "forward_loss", lambda job, subset, xs: spy(
        real_forward(job, subset, xs), subset.inspect == "mlp.down_proj"))
    monkeypatch.setattr(awq_mod, "gram_loss", lambda ctx, linear, original, xs: spy(
        real_gram(ctx, linear, original, xs), linear is down))
    state = quantize_blocks(model, adapter_class("llama", None)(model), Awq(w4, aargs, AwqOptions(weight_clip=False)),
                            batches, set(), RunContext(), quant_out=True)
    assert seen == pytest.approx(losses, rel=1e-4)
    best = min(range(20), key=losses.__getitem__)
    torch.testing.assert_close(state["scales"]["model.layers.0.mlp.down_proj"], scales[best], rtol=1e-5, atol=0)
    if aargs is not None:  # float inputs would have chosen another ratio
        float_losses = _paper_awq_scales(x, down.weight.detach(), wq)[1]
        assert min(range(20), key=float_losses.__getitem__) != best


def test_start_logs_the_clip_and_the_ignored_memory_knobs():
    from loguru import logger

    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    try:
        Awq(W3, None, AwqOptions())
        Awq(W3, None, AwqOptions.model_validate({"clip_sym": False, "awq_bs": 4, "save_mem": False}))
    finally:
        logger.remove(sink)
    clip = [m for m in seen if "clip search" in m]
    assert len(clip) == 2
    assert "symmetric, to ±absmax" in clip[0] and "clip_sym: False" in clip[0] and "weight quantizer" in clip[0]
    assert clip[1].startswith("AWQ clip search: asymmetric")
    knobs = [m for m in seen if "awq_bs" in m]
    assert len(knobs) == 1 and "only bound memory in LLMC" in knobs[0] and "save_mem" in knobs[0]


def test_saved_state_round_trips_and_refuses_other_models(make_config, tmp_path, wiki_files, tiny_dir):
    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 32, "bs": 4},
        "quant": {"method": "Awq", "special": {"save_scale": True, "scale_path": str(tmp_path / "state"),
                                               "save_clip": True, "clip_path": str(tmp_path / "state")}},
        "eval": {"eval_pos": ["pretrain", "fake_quant"]},
        "save": {"save_trans": True},
    })
    assert main(["--config", path]) == 0
    from transformers import AutoModelForCausalLM

    trans = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transformed_model")
    scales, header = load_state(tmp_path / "state", "scales", trans)  # AWQ's output model: same fingerprint
    clips, _ = load_state(tmp_path / "state", "clips", trans)
    assert header["method"] == "AWQ" and header["weight"]["bit"] == 4 and header["folded"] is True
    assert "model.layers.2.mlp.down_proj" in scales and "model.layers.2.mlp.down_proj.max" in clips
    assert header["fingerprint"] == architecture_fingerprint(trans)
    other = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2"))
    with pytest.raises(UserError, match="another model"):
        load_state(tmp_path / "state", "scales", other)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ppl = {e["pos"]: e["ppl"] for e in res["evals"]}
    assert ppl["fake_quant"] > 0


def test_awq_beats_rtn_through_cli(make_config, tmp_path, wiki_files, tiny_dir):
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant
    from tiny import make_tokenizer

    ids = make_tokenizer()(open(wiki_files["test"]).read()[:3000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))(ids).logits
    err = {}
    for method in ("RTN", "Awq"):
        path = make_config({
            "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 16, "seq_len": 64, "bs": 4},
            "quant": {"method": method, "weight": {"bit": 3}}, "eval": {"eval_pos": ["fake_quant"], "num_samples": 2},
            "save": {"save_fake": True, "save_path": str(tmp_path / method)}}, name=f"{method}.yml")
        assert main(["--config", path]) == 0
        with torch.no_grad():
            err[method] = (load_fake_quant(tmp_path / method / "fake_quant_model")(ids).logits - ref).pow(2).mean()
    assert err["Awq"] < err["RTN"]


def test_gram_loss_equals_the_output_mse_of_the_linear():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 24)
    original = linear.weight.data.clone()
    xs = [torch.randn(2, 16, 64), torch.randn(3, 16, 64)]
    loss_of = gram_loss(RunContext(), linear, original, xs)
    assert loss_of() == pytest.approx(0.0, abs=1e-10)
    linear.weight.data = fake_quant(original, W3)
    x = torch.cat([t.reshape(-1, 64) for t in xs])
    expected = (x @ linear.weight.data.t() - x @ original.t()).pow(2).mean().item()
    assert loss_of() == pytest.approx(expected, rel=1e-4)


def test_learnable_calib_keeps_the_weight_and_quantizes_as_if_clipped():
    """calib_algo: learnable leaves the float weight alone (its clips go to OmniQuant) but the fake-quant
    grid is the one clipping would give."""
    base = make_model("llama")
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight[:, ::16] *= 6
    outs = {}
    for algo_name in ("minmax", "learnable"):
        model = copy.deepcopy(base)
        args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32, calib_algo=algo_name)
        algo = Awq(args, None, AwqOptions(trans=False, weight_clip=True))
        adapter = adapter_class("llama", None)(model)
        quantize_blocks(model, adapter, algo, _batches(model), set(), RunContext(), quant_out=True)
        q = model.model.layers[0].mlp.down_proj
        outs[algo_name] = (q.weight.detach().clone(), q.fake_weight().detach().clone())
    assert torch.equal(outs["learnable"][0], base.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(outs["minmax"][0], base.model.layers[0].mlp.down_proj.weight)
    assert torch.allclose(outs["learnable"][1], outs["minmax"][1], atol=1e-6)
