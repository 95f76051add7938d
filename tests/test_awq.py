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


def test_clip_search_lowers_output_error_and_clips():
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::16] *= 6  # heavy-tailed groups: clipping pays off
    algo = Awq(W3, None, AwqOptions(trans=False, weight_clip=True))
    state = quantize_blocks(model, adapter, algo, _batches(model), set(), RunContext(), quant_out=True)
    hi = state["clips"]["model.layers.0.mlp.down_proj.max"]
    assert hi.shape == (64, 128 // 32)
    assert "model.layers.0.self_attn.q_proj.max" not in state["clips"]  # attention-score layers are not clipped
    w = model.model.layers[0].mlp.down_proj.weight.reshape(64, 4, 32)
    assert torch.all(w.amax(-1) <= hi + 1e-6)



@pytest.mark.parametrize("clip_sym", [True, False])
def test_clip_search_picks_the_per_group_best_shrink(clip_sym):
    """Each group's chosen range is the grid point with the least error of that group's partial output."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 10, bias=False)
    linear.weight.data[:, ::7] *= 5
    x = torch.randn(1, 40, 64)
    w = linear.weight.data.clone()
    opts = AwqOptions(clip_sym=clip_sym, clip_grid=20, max_shrink=0.5)
    lo, hi = Awq(W3, None, opts)._clip(linear, [x])
    xs = x.reshape(-1, 64)
    for row in range(10):
        for g in range(2):
            wg, xg = w[row, g * 32:(g + 1) * 32], xs[:, g * 32:(g + 1) * 32]
            top, bottom = (wg.abs().max(), -wg.abs().max()) if clip_sym else (wg.max(), wg.min())
            errs = []
            for i in range(10):
                c = torch.clamp(wg, bottom * (1 - i / 20), top * (1 - i / 20))
                q = fake_quant(c.view(1, -1), W3).view(-1)
                errs.append((xg @ q - xg @ wg).pow(2).mean().item())
            best = min(range(10), key=errs.__getitem__)
            assert hi[row, g].item() == pytest.approx((top * (1 - best / 20)).item(), rel=1e-5)
            assert lo[row, g].item() == pytest.approx((bottom * (1 - best / 20)).item(), rel=1e-5)

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
