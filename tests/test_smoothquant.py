"""SmoothQuant against independent computations written here: the paper's smoothing scales and their
folds, static activation ranges, the fake-quant layer, and the alpha search's per-subset minimum."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from llmc.algorithms.base import Options
from llmc.algorithms.rtn import RTN
from llmc.algorithms.smoothquant import SmoothQuant, SmoothQuantOptions
from llmc.cli import main
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.export.state import load_state
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear, quant_disabled
from llmc.quant.quantizer import QuantArgs
from tiny import FAMILIES, make_model

W8 = QuantArgs(bit=8, symmetric=True, granularity="per_channel")
A8 = QuantArgs(bit=8, symmetric=True, granularity="per_token")


def _batches(model, n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (2, 32), generator=g) for _ in range(n)]


def _adapter(model):
    return adapter_class(model.config.model_type, None)(model)


def _run(model, algo, batches=None, quant_out=True):
    return quantize_blocks(model, _adapter(model), algo, batches or _batches(model), set(), RunContext(),
                           quant_out=quant_out)


# ---- independent reference pieces ----------------------------------------------------------------
def qdq(x, absmax, bits):
    """Symmetric signed-grid quantize-dequantize, step absmax / ((2^b - 1) / 2) (llmc's documented grid)."""
    step = absmax / ((2 ** bits - 1) / 2)
    return torch.clamp(torch.round(x / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * step


def qdq_rows(w, bits):
    return qdq(w, w.abs().amax(-1, keepdim=True), bits)


def paper_scales(x_absmax, w_absmax, alpha):
    """SmoothQuant eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    return x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)


def norm_led(adapter, block):
    """(prev_op, subset) for the subsets behind a norm: the ones SmoothQuant smooths by default."""
    return [(s.prev_op, s) for s in adapter.subsets
            if s.prev_op and not isinstance(block.get_submodule(s.prev_op), nn.Linear)]


def float_captures(model, batches):
    """Per block and norm-led subset, over all batches: the norm's input and output, and the inspect
    module's call (args, kwargs), from the float model."""
    adapter = _adapter(model)
    got, handles = {}, []
    for i, block in enumerate(adapter.block_list()):
        for prev, subset in norm_led(adapter, block):
            rec = got.setdefault((i, prev), {"in": [], "out": [], "call": []})
            norm = block.get_submodule(prev)
            handles.append(norm.register_forward_hook(lambda m, a, o, rec=rec: _record(rec, a[0], o)))
            handles.append(block.get_submodule(subset.inspect).register_forward_pre_hook(
                lambda m, a, k, rec=rec: rec["call"].append((a, k)) and None, with_kwargs=True))
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return got


def _record(rec, x, y) -> None:
    rec["in"].append(x.detach())
    rec["out"].append(y.detach())


def call_inspect(module, call, x):
    args, kwargs = call
    out = module(x, *args[1:], **kwargs) if args else module(**{**kwargs, "hidden_states": x})
    return out[0] if isinstance(out, tuple) else out


# ---- the smoothing itself ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("opts", [dict(), dict(smooth_all=True, use_shift=True, alpha_search=True, alpha_step=0.3)])
def test_smoothing_keeps_the_float_model(family, opts):
    model = make_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    state = _run(model, SmoothQuant(W8, A8, SmoothQuantOptions(**opts)))
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in state["scales"].values())
    if opts and family != "opt":  # v→o across GQA groups
        assert "model.layers.1.self_attn.o_proj" in state["scales"]
    if opts and family == "opt":  # LayerNorm and linear biases absorb the channel shift
        assert "model.decoder.layers.0.fc1" in state["shifts"]
    with torch.no_grad(), quant_disabled(model):
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothing_scales_and_folds_follow_the_paper(family):
    """s = max|X|^a / max|W|^(1-a) per input channel (X over all calibration tokens, W over the rows of
    every linear of the subset); the norm's weight (and bias) divided by s, each linear's columns times s."""
    alpha = 0.8
    model = make_model(family)
    original = copy.deepcopy(model)
    batches = _batches(model)
    captured = float_captures(original, batches)
    # quant_out False: every block is calibrated on the float model's own activations, captured above
    state = _run(model, SmoothQuant(W8, A8, SmoothQuantOptions(alpha=alpha)), batches, quant_out=False)
    adapter, ref_adapter = _adapter(model), _adapter(original)
    checked = 0
    for i, (block, ref) in enumerate(zip(adapter.block_list(), ref_adapter.block_list())):
        for prev, subset in norm_led(ref_adapter, ref):
            x = torch.cat([o.reshape(-1, o.shape[-1]) for o in captured[(i, prev)]["out"]])
            w = torch.cat([ref.get_submodule(n).weight for n in subset.layers])
            s = paper_scales(x.abs().amax(0), w.abs().amax(0), alpha)
            norm, ref_norm = block.get_submodule(prev), ref.get_submodule(prev)
            torch.testing.assert_close(norm.weight, ref_norm.weight / s, rtol=1e-5, atol=0)
            if getattr(ref_norm, "bias", None) is not None:
                torch.testing.assert_close(norm.bias, ref_norm.bias / s, rtol=1e-5, atol=1e-7)
            for name in subset.layers:
                torch.testing.assert_close(block.get_submodule(name).weight, ref.get_submodule(name).weight * s,
                                           rtol=1e-5, atol=0)
                torch.testing.assert_close(state["scales"][f"{adapter.block_name(i)}.{name}"], s, rtol=1e-5, atol=0)
                checked += 1
    assert checked == (5 if family == "llama" else 4) * len(adapter.block_list())  # q/k/v + gate/up (fc1)


def test_static_w8a8_ranges_and_the_fake_quant_layer():
    """Static per-tensor activation scale = absmax of the (smoothed) calibration input / 127.5, and each
    quantized linear computes Q_a(x) Q_w(W)^T + b with those grids."""
    alpha, a8 = 0.8, QuantArgs(bit=8, symmetric=True, granularity="per_tensor", static=True)
    model = make_model("llama")
    original = copy.deepcopy(model)
    batches = _batches(model)
    captured = float_captures(original, batches)
    _run(model, SmoothQuant(W8, a8, SmoothQuantOptions(alpha=alpha)), batches, quant_out=False)
    adapter, ref_adapter = _adapter(model), _adapter(original)
    for i, (block, ref) in enumerate(zip(adapter.block_list(), ref_adapter.block_list())):
        # q/k/v read the smoothed norm output of the float stream: their range follows from the float model
        x = torch.cat([o.reshape(-1, 64) for o in captured[(i, "input_layernorm")]["out"]])
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        w = torch.cat([ref.get_submodule(n).weight for n in names])
        s = paper_scales(x.abs().amax(0), w.abs().amax(0), alpha)
        for n in names:
            torch.testing.assert_close(block.get_submodule(n).act_quant.scale.reshape(()),
                                       (x / s).abs().max() / 127.5, rtol=1e-5, atol=0)
        # every linear: the range of what it reads when its block gets the float inputs, with quantized
        # weights and float activations (what calibration observes)
        inputs, handles = {}, []
        qlinears = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        assert len(qlinears) == 7
        acts = {n: q.act_quant for n, q in qlinears.items()}
        for n, q in qlinears.items():
            q.act_quant = None
            handles.append(q.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0])))
        try:
            with torch.no_grad():
                for h, call in zip(captured[(i, "input_layernorm")]["in"], _block_calls(original, i, batches)):
                    block(h, **call)
        finally:
            for n, q in qlinears.items():
                q.act_quant = acts[n]
            for hd in handles:
                hd.remove()
        for n, q in qlinears.items():
            absmax = max(t.abs().max() for t in inputs[n])
            torch.testing.assert_close(q.act_quant.scale.reshape(()), absmax / 127.5, rtol=1e-6, atol=0)
            # the layer on a fresh input (beyond the calibrated range too: clamped to the grid's ends)
            xin = torch.randn(3, 5, q.in_features) * absmax * 0.6
            expected = F.linear(qdq(xin, absmax, 8), qdq_rows(q.weight, 8), q.bias)
            with torch.no_grad():
                torch.testing.assert_close(q(xin), expected, rtol=1e-5, atol=1e-6)


def _block_calls(model, index, batches):
    """The kwargs block `index` is called with, per batch, in the float model."""
    calls = []
    block = _adapter(model).block_list()[index]
    h = block.register_forward_pre_hook(lambda m, a, k: calls.append({**k, "use_cache": False}), with_kwargs=True)
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    h.remove()
    return calls


def _planted(family="llama"):
    model = make_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 40
            layer.post_attention_layernorm.weight[[5, 33]] *= 25
    return model


def _q_proj_error(model, algo, ids) -> float:
    outs = {}
    layer = model.model.layers[0].self_attn
    hook = lambda m, i, o: outs.__setitem__("y", o)  # noqa: E731
    with torch.no_grad():
        h = layer.q_proj.register_forward_hook(hook)
        model(ids)
        ref = outs["y"]
        h.remove()
        _run(model, algo)
        h = model.model.layers[0].self_attn.q_proj.register_forward_hook(hook)
        model(ids)
        h.remove()
    return (outs["y"] - ref).pow(2).mean().item()


def test_planted_activation_outliers_smoothquant_beats_rtn_at_w8a8():
    base = _planted()
    ids = torch.randint(0, base.config.vocab_size, (2, 24))
    a8 = QuantArgs(bit=8, symmetric=True, granularity="per_tensor")
    rtn = _q_proj_error(copy.deepcopy(base), RTN(W8, a8, Options()), ids)
    sq = _q_proj_error(copy.deepcopy(base), SmoothQuant(W8, a8, SmoothQuantOptions(alpha=0.5)), ids)
    assert sq < 0.1 * rtn


# ---- the alpha search ----------------------------------------------------------------------------
GRID = [0.1, 0.3, 0.5, 0.7, 0.9]


def _subset_error(float_module, subset, calls, xs, w4, a4, s=None, quantized=None, inputs=None):
    """MSE of the inspect module's output with only the subset's linears quantized, against the float
    module on the float inputs xs. Either smoothing by s and the quantizers are applied here to a copy of
    the float module, or `quantized` (the searched block's module, already smoothed and quantized) reads
    `inputs` (the float inputs divided by the scale the search folded)."""
    handles = []
    if quantized is None:
        quantized, inputs = copy.deepcopy(float_module), [x / s for x in xs]
        prefix = subset.inspect + "."
        for name in subset.layers:
            lin = quantized.get_submodule(name[len(prefix):]) if name.startswith(prefix) else quantized
            with torch.no_grad():
                lin.weight.copy_(qdq_rows(lin.weight * s, w4.bit))
            handles.append(lin.register_forward_pre_hook(
                lambda m, a: (qdq(a[0], a[0].abs().amax(-1, keepdim=True), a4.bit),)))
    total, count = 0.0, 0
    with torch.no_grad():
        for x, call, x_in in zip(xs, calls, inputs):
            out = call_inspect(quantized, call, x_in)
            total += (out - call_inspect(float_module, call, x)).pow(2).sum().item()
            count += out.numel()
    for h in handles:
        h.remove()
    return total / count


def test_alpha_search_picks_the_least_subset_error_on_the_grid():
    """Per block and subset, the searched alpha's quantized subset error (measured here on the searched
    model) equals the least of the errors each grid alpha gives (computed here from the paper's scales)."""
    w4 = QuantArgs(bit=4, symmetric=True, granularity="per_channel")
    a4 = QuantArgs(bit=4, symmetric=True, granularity="per_token")
    base = _planted()
    batches = _batches(base)
    captured = float_captures(base, batches)
    searched = copy.deepcopy(base)
    opts = SmoothQuantOptions(alpha_search=True, alpha_min=GRID[0], alpha_max=GRID[-1], alpha_step=0.2)
    state = _run(searched, SmoothQuant(w4, a4, opts), batches, quant_out=False)
    ref_adapter, adapter = _adapter(base), _adapter(searched)
    picks = []
    for i, (ref, block) in enumerate(zip(ref_adapter.block_list(), adapter.block_list())):
        for prev, subset in norm_led(ref_adapter, ref):
            rec = captured[(i, prev)]
            x = torch.cat([o.reshape(-1, o.shape[-1]) for o in rec["out"]])
            w = torch.cat([ref.get_submodule(n).weight for n in subset.layers])
            fixed = [_subset_error(ref.get_submodule(subset.inspect), subset, rec["call"], rec["out"], w4, a4,
                                   s=paper_scales(x.abs().amax(0), w.abs().amax(0), a)) for a in GRID]
            # the searched block: only this subset quantized (its own weights and act quantizers), reading
            # the float inputs divided by the scale it folded. (Not through its folded norm: that rounds in
            # the last bit differently, and the symmetric 4-bit grid puts each token's negative absmax on a
            # rounding tie at -7.5, which moves the error by ~0.4% either way.)
            s = state["scales"][f"{adapter.block_name(i)}.{subset.layers[0]}"]
            torch.testing.assert_close(block.get_submodule(prev).weight, ref.get_submodule(prev).weight / s,
                                       rtol=1e-5, atol=0)
            others = [m for n, m in block.named_modules() if isinstance(m, QuantLinear)
                      and n not in subset.layers]
            for m in others:
                m.quant_enabled = False
            got = _subset_error(ref.get_submodule(subset.inspect), subset, rec["call"], rec["out"], w4, a4,
                                quantized=block.get_submodule(subset.inspect), inputs=[x / s for x in rec["out"]])
            for m in others:
                m.quant_enabled = True
            assert got <= min(fixed) * (1 + 1e-6), (i, prev, got, fixed)
            picks.append(min(range(len(GRID)), key=fixed.__getitem__))
    assert len(set(picks)) > 1  # the grid minimum moves between subsets: a fixed pick would fail above


# ---- config and CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize("special, stages, words", [
    ({"alpha": 0.8, "alpha_search": True}, False, ["quant.special.alpha: 0.8", "alpha_min", "alpha_max", "alpha_step"]),
    ({"alpha": 0.8, "alpha_search": True}, True, ["stages.0.special.alpha: 0.8", "alpha_min", "alpha_step"]),
    ({"alpha_search": True, "alpha_step": 0}, False, ["quant.special.alpha_step: 0", "> 0"]),
])
def test_alpha_options_that_would_be_ignored_or_crash_are_refused(make_config, wiki_files, capsys, special, stages,
                                                                  words):
    quant = {"method": "SmoothQuant", "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
             "special": special}
    path = make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32},
                        "quant": quant})
    if stages:
        raw = yaml.safe_load(open(path))
        raw["stages"] = [raw.pop("quant")]
        open(path, "w").write(yaml.safe_dump(raw))
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_alpha_search_without_alpha_and_alpha_without_search_are_accepted(make_config, wiki_files):
    from llmc.config import load_config

    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32}
    act = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    for special in ({"alpha_search": True}, {"alpha": 0.8}, {"alpha": 0.8, "alpha_search": False}):
        load_config(make_config({"calib": calib, "quant": {"method": "SmoothQuant", "act": act,
                                                           "special": special}}))


def test_smoothquant_cli_saves_the_scales_it_folded(make_config, tmp_path, wiki_files):
    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
        "quant": {"method": "SmoothQuant",
                  "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                  "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True,
                          "calib_algo": "percentile"},
                  "special": {"alpha": 0.8, "save_scale": True, "scale_path": str(tmp_path / "sq")}},
        "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant"]},
        "save": {"save_trans": True},
    })
    assert main(["--config", path]) == 0
    scales, header = load_state(tmp_path / "sq", "scales")
    assert header["method"] == "SmoothQuant"
    from transformers import AutoModelForCausalLM

    from test_rtn_cli import _results
    trans = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transformed_model")
    orig = AutoModelForCausalLM.from_pretrained(_results(tmp_path)["config"]["model"]["path"])
    assert len(scales) == 5 * 3  # q/k/v and gate/up of every block: the norm-led subsets
    for i in range(3):
        for norm, names in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                            ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            part = "self_attn" if norm == "input_layernorm" else "mlp"
            s = scales[f"model.layers.{i}.{part}.{names[0]}"]
            ref_norm = getattr(orig.model.layers[i], norm).weight
            torch.testing.assert_close(getattr(trans.model.layers[i], norm).weight, ref_norm / s, rtol=1e-5, atol=0)
            for n in names:
                assert torch.equal(scales[f"model.layers.{i}.{part}.{n}"], s)
    evals = {e["pos"]: e["ppl"] for e in _results(tmp_path)["evals"]}
    assert evals["transformed"] == pytest.approx(evals["pretrain"], rel=1e-4)  # folding keeps the float model
    assert math.isfinite(evals["fake_quant"])


def test_smoothquant_without_act_section_is_refused(make_config, capsys):
    path = make_config({"quant": {"method": "SmoothQuant"}})
    assert main(["--config", path]) == 2
    assert "quant.act" in capsys.readouterr().err


def test_saved_w8a8_fake_quant_reloads_with_the_same_ppl(make_config, tmp_path, wiki_files):
    from test_rtn_cli import _ppl, _results

    from llmc.export.save import load_fake_quant

    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
        "quant": {"method": "SmoothQuant",
                  "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                  "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
                  "special": {"alpha": 0.8, "smooth_all": True}},
        "save": {"save_fake": True},
    })
    assert main(["--config", path]) == 0
    fq = next(e for e in _results(tmp_path)["evals"] if e["pos"] == "fake_quant")
    reloaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    acts = [m.act_quant for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert len(acts) == 21 and all(a.args.granularity == "per_token" and not a.args.static for a in acts)
    assert _ppl(reloaded, wiki_files["test"]) == pytest.approx(fq["ppl"], rel=1e-5)
