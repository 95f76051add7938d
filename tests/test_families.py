"""Every model family in tests/tiny.FAMILIES through the paths a user takes: perplexity block by block,
folds that keep the float model, weight-only quantization on its grid, exports reloaded by transformers,
and the dry-run plan. The blockwise no-op pass itself is tests/test_engine.py's, over the same families."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmc.algorithms.awq import Awq, AwqOptions
from llmc.algorithms.gptq import GPTQ, GPTQOptions
from llmc.algorithms.omniquant import OmniQuant, OmniQuantOptions
from llmc.algorithms.rtn import RTN
from llmc.algorithms.base import Options
from llmc.algorithms.smoothquant import SmoothQuant, SmoothQuantOptions
from llmc.cli import main
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.evaluation.ppl import perplexity
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear, quant_disabled
from llmc.quant.quantizer import QuantArgs
from tiny import FAMILIES as DENSE, MOE_FAMILIES, VOCAB, make_model, make_tokenizer, tiny_config

FAMILIES = DENSE + MOE_FAMILIES  # every registered family, dense and mixture-of-experts

W4 = QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32)
A8 = QuantArgs(bit=8, symmetric=True, granularity="per_token")
SEQ = 32  # longer than the tiny Gemmas' sliding window (8): sliding and full layers differ


def _model(family, norms=False):
    model = make_model(family)
    if norms:  # norm scales away from identity (Gemma's (1 + w) too): a wrong fold cannot hide
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and p.dim() == 1:
                    p.add_(torch.rand(p.shape, generator=g) - 0.5)
    return model, adapter_class(model.config.model_type, None)(model)


def _batches(n=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, SEQ), generator=g) for _ in range(n)]


def _linears(adapter, foldable: bool = False) -> list[str]:
    """Full names of every quantized linear, block by block (MoE models mix dense and expert blocks); with
    foldable, only those behind an op that takes a scale (DeepSeek's o_proj and kv_a_proj have none)."""
    return [f"{adapter.block_name(i)}.{n}" for i in range(len(adapter.block_list()))
            for s in adapter.block_subsets(i) if s.prev_op is not None or not foldable for n in s.layers]


# ---- (1) the model's own function through the engine ----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_is_the_models_own(family):
    """PPL, whole-model and block by block, equals exp(mean NLL) of the model's own logits (with
    Gemma 2's final soft-capping and sliding-window layers)."""
    model, adapter = _model(family)
    windows = _batches(1)[0]
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    expected = math.exp(nll.mean().item())
    for per_block in (False, True):
        assert perplexity(model, adapter, windows, 1, RunContext(), per_block) == pytest.approx(expected, rel=1e-5)


def _allowed(mask, q: int, k: int) -> bool:
    """Whether query position q attends to key k under a captured mask (None: plain causal)."""
    if mask is None:
        return k <= q
    m = mask[0, 0, q, k]
    return bool(m) if m.dtype == torch.bool else m.item() == 0


SLIDING = [f for f in FAMILIES if len(set(getattr(tiny_config(f), "layer_types", None) or [])) > 1]


@pytest.mark.parametrize("family", SLIDING)
def test_each_block_gets_the_mask_of_its_layer_type(family):
    model, adapter = _model(family)
    inputs = capture_block_inputs(model, adapter, _batches(1), RunContext())
    window = model.config.sliding_window
    types = model.config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(types)
    for i, kind in enumerate(types):
        mask = inputs.kwargs[i][0].get("attention_mask")
        q = SEQ - 1
        assert _allowed(mask, q, q) and not _allowed(mask, q - 1, q)
        assert _allowed(mask, q, 0) == (kind == "full_attention"), (i, kind)
        assert _allowed(mask, q, q - window + 1)


# ---- (2) folds keep the float model ---------------------------------------------------------------------
FOLDS = {
    "AWQ": lambda: Awq(W4, None, AwqOptions(weight_clip=False, n_grid=4)),
    "SmoothQuant": lambda: SmoothQuant(W4, A8, SmoothQuantOptions(smooth_all=True)),
    "OmniQuant-LET": lambda: OmniQuant(W4, A8, OmniQuantOptions(let=True, lwc=False, epochs=1, let_lr=0.05,
                                                                smooth_up_down=True)),
}


def _special_folds(family) -> bool:
    """The family declares a fold beyond a plain norm or linear: a norm's unit offset, a row slice."""
    from llmc.models import meta_model

    config = tiny_config(family)
    adapter = adapter_class(config.model_type, None)(meta_model(config))
    return any(s.prev_offset or s.prev_rows for s in adapter.subsets)


# OmniQuant's LET parametrizes the same folds: run where a family declares something beyond llama's
CASES = [(f, m) for f in FAMILIES for m in FOLDS if m != "OmniQuant-LET" or _special_folds(f)]


@pytest.mark.parametrize("family,method", CASES)
def test_folds_keep_the_float_logits(family, method):
    """With the fold guard off (so this test, not the guard, does the checking), every scale folded into
    norms (Gemma's 1 + w), linears and fused linears' row slices (Phi-3's v rows of qkv_proj, up rows of
    gate_up_proj) leaves the float model's logits as they were."""
    model, adapter = _model(family, norms=True)
    ids = _batches(1)[0]
    with torch.no_grad():
        reference = model(ids).logits
        before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state = quantize_blocks(model, adapter, FOLDS[method](), _batches(1), set(), RunContext(check_folds=False),
                            quant_out=True)
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
    if method == "OmniQuant-LET":  # folds leave no state: every linear's columns were rescaled
        changed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)
                   and not torch.equal(m.weight.detach(), before[n])}
    else:
        changed = set(state["scales"])
    missing = set(_linears(adapter, foldable=True)) - changed
    assert not missing, f"no fold for {sorted(missing)}"


# ---- (3) weight-only W4 on its grid ---------------------------------------------------------------------
def _minmax_grid(w: torch.Tensor, bit=4, group=32):
    """Per group of `group` inputs: scale = (max - min) / (2^b - 1) over the group with 0 included, zero =
    round(-min / scale); returns the grid's scale and zero broadcast over w, and RTN's weight."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    top = 2 ** bit - 1
    scale = ((hi - lo) / top).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    rtn = (torch.clamp(torch.round(g / scale) + zero, 0, top) - zero) * scale
    return scale, zero, rtn.reshape(w.shape)


@pytest.mark.parametrize("method", ["RTN", "GPTQ"])
@pytest.mark.parametrize("family", FAMILIES)
def test_w4_weights_are_on_their_grid(family, method):
    """Every quantized linear's dequantized weight lies on its group's 16-level min/max grid, computed here
    from the float weight (GPTQ with static_groups takes its grid from the weight before its updates);
    RTN's is the rounding itself, GPTQ's differs from it (its updates did something)."""
    model, adapter = _model(family)
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in _linears(adapter)}
    algo = RTN(W4, None, Options()) if method == "RTN" else GPTQ(W4, None, GPTQOptions(static_groups=True))
    quantize_blocks(model, adapter, algo, None if method == "RTN" else _batches(1), set(), RunContext(),
                    quant_out=True)
    with torch.no_grad():
        assert torch.isfinite(model(_batches(1)[0]).logits).all()
    for name, w0 in floats.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear), name
        w = q.fake_weight().detach().float()
        if method == "GPTQ":  # as the reference, GPTQ zeroes the columns of inputs that never fired (ReLU)
            w0 = torch.where((w == 0).all(0, keepdim=True), torch.zeros_like(w0), w0)
        scale, zero, rtn = _minmax_grid(w0)
        codes = w.reshape(scale.shape[0], -1, 32) / scale + zero
        assert (codes - codes.round()).abs().max() < 1e-3, name
        assert codes.round().min() >= 0 and codes.round().max() <= 15, name
        if method == "RTN":
            torch.testing.assert_close(w, rtn, atol=1e-6, rtol=0)
        else:
            assert not torch.allclose(w, rtn), name


# ---- (4) exports reload in transformers to the fake-quant logits -----------------------------------------
def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_exports_reload_to_the_fake_quant_logits(family, tmp_path):
    """fake_quant_model/ (asymmetric W4) and compressed-tensors pack-quantized (symmetric W4, transformers'
    packed load, fused qkv_proj / gate_up_proj as ordinary linears) give the fake-quant model's logits.
    GPTQ and AutoAWQ folders need GPTQModel: tests/test_export_clients_gptqmodel.py."""
    from llmc.export import compressed
    from llmc.export.save import save_fake_quant

    ids = _batches(1)[0]
    for args, save, folder in ((W4, save_fake_quant, "fake"),
                               (QuantArgs(bit=4, symmetric=True, granularity="per_group", group_size=32),
                                compressed.save, "ct")):
        model, adapter = _model(family)
        quantize_blocks(model, adapter, RTN(args, None, Options()), None, set(), RunContext(), quant_out=True)
        with torch.no_grad():
            expected = model(ids).logits
        save(model, make_tokenizer(), tmp_path / folder)
        loaded = _load(tmp_path / folder)
        with torch.no_grad():
            got = loaded(ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (folder, (got - expected).abs().max())
        with torch.no_grad(), quant_disabled(model):  # the quantization is what was reloaded
            assert not torch.allclose(model(ids).logits, got, atol=1e-3)


# ---- (5) the dry-run plan -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_lists_every_quantized_linear(family, make_config, capsys):
    assert main(["--config", make_config(family=family), "--dry-run"]) == 0
    out = capsys.readouterr().out
    model, adapter = _model(family)
    assert f"({model.config.model_type}, 3 blocks" in out
    listed = [line.split("<-")[0].strip() for line in out.splitlines() if "<- prev_op" in line]
    assert {n for line in listed for n in line.split(", ")} == set(adapter.linear_names())
    quantizable = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {adapter.lm_head}
    readers = {f"{adapter.block_name(i)}.{r}" for i in range(len(adapter.block_list()))
               for s in adapter.block_subsets(i) for r in s.readers}  # routers' gates stay float by design
    assert set(_linears(adapter)) == quantizable - readers  # nothing else in a block is left out


# ---- declared family names ------------------------------------------------------------------------------
@pytest.mark.parametrize("declared,model_type", [("Qwen3", "qwen3"), ("Gemma2", "gemma2"), ("Gemma3", "gemma3_text"),
                                                 ("gemma3_text", "gemma3_text"), ("Phi3", "phi3")])
def test_llmc_spellings_of_the_new_families(declared, model_type):
    assert adapter_class(model_type, declared) is adapter_class(model_type, None)


@pytest.mark.parametrize("declared,model_type", [("Gemma2", "gemma3_text"), ("Qwen3", "qwen2"), ("Phi3", "llama")])
def test_another_familys_name_is_refused(declared, model_type):
    with pytest.raises(Exception, match="does not match"):
        adapter_class(model_type, declared)


def test_a_family_without_an_adapter_is_refused():
    with pytest.raises(Exception, match="no adapter for the checkpoint's model_type 'gpt2'"):
        adapter_class("gpt2", None)


@pytest.mark.parametrize("method", ["SmoothQuant", "OmniQuant-LET"])
def test_a_fused_linear_with_biases_takes_scale_and_shift_on_its_rows(method):
    """Phi-3 with biases added to qkv_proj, o_proj and gate_up_proj: the v→o fold divides (and shifts)
    only v's rows of qkv_proj's weight and bias, the up→down fold only up's rows of gate_up_proj."""
    model, adapter = _model("phi3", norms=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in adapter.block_list():
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
                old = block.get_submodule(name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                new.weight.copy_(old.weight)
                new.bias.copy_(torch.randn(old.out_features, generator=g) * 0.5)
                setattr(block.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], new)
    ids = _batches(1)[0]
    with torch.no_grad():
        reference = model(ids).logits
        qkv_before = adapter.block_list()[0].self_attn.qkv_proj.bias.detach().clone()
    algo = (SmoothQuant(W4, A8, SmoothQuantOptions(smooth_all=True, use_shift=True)) if method == "SmoothQuant" else
            OmniQuant(W4, A8, OmniQuantOptions(let=True, lwc=False, use_shift=True, smooth_up_down=True, epochs=1,
                                               let_lr=0.05)))
    state = quantize_blocks(model, adapter, algo, _batches(1), set(), RunContext(check_folds=False), quant_out=True)
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
    qkv_after = adapter.block_list()[0].self_attn.qkv_proj.bias.detach()
    v = adapter.subsets[1].prev_rows
    assert torch.equal(qkv_after[:v[0]], qkv_before[:v[0]])  # q and k rows untouched
    assert not torch.allclose(qkv_after[v[0]:], qkv_before[v[0]:])
    if method == "SmoothQuant":
        assert "model.layers.0.self_attn.o_proj" in state["shifts"]
