"""Mixture-of-experts families: fused experts unfused into one linear per expert matrix, per-expert
calibration and quantization, router compensation in folds, export back to transformers' layout."""
import copy

import pytest
import torch

from llmc.algorithms.awq import Awq, AwqOptions
from llmc.algorithms.gptq import GPTQ, GPTQOptions
from llmc.algorithms.rtn import RTN
from llmc.algorithms.base import Options
from llmc.cli import main
from llmc.engine.block import BlockJob
from llmc.engine.context import RunContext
from llmc.engine.pipeline import forward_per_block, quantize_blocks
from llmc.errors import UserError
from llmc.models.adapter import adapter_class
from llmc.models.moe import Experts
from llmc.quant.fake_linear import QuantLinear, quant_disabled
from llmc.quant.quantizer import QuantArgs
from tiny import MOE_FAMILIES, VOCAB, make_model

W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 16}


def _fused(family, seed=0):
    model = make_model(family, seed)
    model.config._experts_implementation = "eager"  # transformers' reference loop
    return model


def _unfused(model):
    model = copy.deepcopy(model)
    return model, adapter_class(model.config.model_type, None)(model)


def _batches(n=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n // 2)]


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits for b in batches])


def _moe_blocks(adapter):
    return [i for i, b in enumerate(adapter.block_list()) if any(isinstance(m, Experts) for m in b.modules())]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_the_fused_module(family):
    fused = _fused(family)
    model, adapter = _unfused(fused)
    moe = _moe_blocks(adapter)
    assert moe
    gate, up, down = adapter.expert_linears
    for i in moe:
        ref = adapter.block_list()[i].mlp.experts
        src = fused.model.layers[i].mlp.experts
        inter = src.down_proj.shape[2]
        for e in range(4):  # each linear holds its slice of the fused tensors
            ex = ref[e]
            assert isinstance(getattr(ex, gate), torch.nn.Linear)
            assert torch.equal(getattr(ex, gate).weight, src.gate_up_proj[e, :inter])
            assert torch.equal(getattr(ex, up).weight, src.gate_up_proj[e, inter:])
            assert torch.equal(getattr(ex, down).weight, src.down_proj[e])
        # on random inputs and random routing, the module alone
        g = torch.Generator().manual_seed(i)
        x = torch.randn(24, 64, generator=g)
        idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)])
        w = torch.rand(24, 2, generator=g)
        with torch.no_grad():
            assert torch.equal(ref(x, idx, w), src(x, idx, w))
    batches = _batches()
    assert torch.equal(_logits(model, batches), _logits(fused, batches))
    fused.config._experts_implementation = "grouped_mm"  # transformers' default on this machine
    torch.testing.assert_close(_logits(model, batches), _logits(fused, batches), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_blockwise_pass_and_all_expert_calibration_keep_the_logits(family):
    """A no-op pass block by block reproduces the logits, and so does a block forward in which every
    expert sees every token (calibrate_all_experts): the output follows the router."""
    model, adapter = _unfused(_fused(family))
    batches = _batches()
    ctx = RunContext()
    with torch.no_grad():
        ref = [model.model(b).last_hidden_state for b in batches]
    for h, r in zip(forward_per_block(model, adapter, batches, ctx), ref):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    from llmc.models.moe import calibrating

    with calibrating(model, True), torch.no_grad():
        every = [model.model(b).last_hidden_state for b in batches]
    for h, r in zip(every, ref):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)


def _router_logits(model, adapter, batches):
    """Router logits of every MoE block on the float model's own block inputs."""
    got = {}
    hooks = [adapter.block_list()[i].get_submodule(adapter.router).register_forward_hook(
        lambda m, inp, out, i=i: got.setdefault(i, []).append(out[0].detach().clone())) for i in _moe_blocks(adapter)]
    _logits(model, batches)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])  # shared-expert gate; float32 router
def test_awq_fold_keeps_router_logits_and_float_model(family):
    model, adapter = _unfused(_fused(family))
    batches = _batches()
    ref, routers = _logits(model, batches), _router_logits(model, adapter, batches)
    algo = Awq(QuantArgs.from_cfg(_spec(W4)), None, AwqOptions(weight_clip=False))
    state = quantize_blocks(model, adapter, algo, batches, set(), RunContext(), quant_out=False)
    post = [n for n in state["scales"] if n.endswith("experts.0." + adapter.expert_linears[0])]
    assert post, "a scale was folded into post_attention_layernorm"
    with quant_disabled(model):
        torch.testing.assert_close(_logits(model, batches), ref, atol=1e-4, rtol=1e-4)
        for i, logits in _router_logits(model, adapter, batches).items():
            torch.testing.assert_close(logits, routers[i], atol=1e-5, rtol=1e-5)
    # the scale really changed the router's weights (so the check above is not vacuous)
    raw = _fused(family).model.layers[_moe_blocks(adapter)[0]].mlp.gate.weight
    assert not torch.allclose(adapter.block_list()[_moe_blocks(adapter)[0]].mlp.gate.weight, raw)


def _spec(d):
    from llmc.config.schema import QuantSpecCfg

    return QuantSpecCfg(**d)


@pytest.mark.parametrize("family,method", [(f, "RTN") for f in MOE_FAMILIES] + [("qwen3_moe", "GPTQ"),
                                                                                  ("deepseek_v3", "GPTQ")])
def test_every_expert_linear_is_quantized_on_its_grid(family, method):
    from llmc.quant.quantizer import grouped

    model, adapter = _unfused(_fused(family))
    batches = _batches()
    args = QuantArgs.from_cfg(_spec(W4))
    algo = RTN(args, None, Options()) if method == "RTN" else GPTQ(args, None, GPTQOptions())
    quantize_blocks(model, adapter, algo, batches if method == "GPTQ" else None, set(), RunContext(), False)
    names = {f"{adapter.block_name(i)}.{n}" for i in range(3) for n in adapter.block_linear_names(i)}
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 3 * 4 * len(_moe_blocks(adapter))
    for name in names:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear), name
        w = grouped(q.fake_weight().float(), args)
        levels = (w / q.w_scale.reshape(-1, 1) + q.w_zero.reshape(-1, 1))
        assert torch.allclose(levels, levels.round(), atol=1e-3), name
        assert (levels.round().amax(1) - levels.round().amin(1)).max() <= 15, name  # 16 levels per group
    for router in (adapter.router,):
        for i in _moe_blocks(adapter):
            assert not isinstance(adapter.block_list()[i].get_submodule(router), QuantLinear)
    assert torch.isfinite(_logits(model, batches)).all()


def _hessian_rows(monkeypatch):
    """Rows each GPTQ Hessian accumulates, by (block, input name)."""
    rows = {}
    original = BlockJob.collect

    def counting(self, names, fn, end_batch=None):
        def wrapped(name, x):
            rows[(self.index, name)] = rows.get((self.index, name), 0) + x.reshape(-1, x.shape[-1]).shape[0]
            fn(name, x)
        return original(self, names, wrapped, end_batch)

    monkeypatch.setattr(BlockJob, "collect", counting)
    return rows


@pytest.mark.parametrize("all_experts", [True, False])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_calibrate_all_experts_sets_what_each_expert_hessian_counts(monkeypatch, family, all_experts):
    model, adapter = _unfused(_fused(family))
    batches = _batches(n=8, seq=32)
    tokens = sum(b.numel() for b in batches)
    # independently: the experts each token is routed to, from the float model's router
    routed = {}
    for i in _moe_blocks(adapter):
        router = adapter.block_list()[i].get_submodule(adapter.router)
        idx = []
        h = router.register_forward_hook(lambda m, inp, out: idx.append(out[2]))
        _logits(model, batches)
        h.remove()
        routed[i] = torch.bincount(torch.cat(idx).flatten(), minlength=4).tolist()
    rows = _hessian_rows(monkeypatch)
    # one collection pass over the float block (true_sequential would route on partly quantized blocks)
    gptq = GPTQ(QuantArgs.from_cfg(_spec(W4)), None, GPTQOptions(true_sequential=False))
    quantize_blocks(model, adapter, gptq, batches, set(), RunContext(), False, all_experts=all_experts)
    gate = adapter.expert_linears[0]
    for i in _moe_blocks(adapter):
        got = [rows[(i, f"mlp.experts.{e}.{gate}")] for e in range(4)]
        assert got == ([tokens] * 4 if all_experts else routed[i]), (i, got, routed[i])
        down = [rows[(i, f"mlp.experts.{e}.{adapter.expert_linears[2]}")] for e in range(4)]
        assert down == got


@pytest.mark.parametrize("all_experts", [True, False])
def test_expert_gptq_equals_each_expert_solved_alone(all_experts):
    """Experts reading one input (every token, under calibrate_all_experts) share one Hessian and one
    stacked solve; each expert's weight must still be exactly what GPTQ gives it alone, from the Hessian
    of the tokens it reads, computed here from the float model's first MoE block."""
    from llmc.algorithms.gptq import gptq_quantize

    model, adapter = _unfused(_fused("qwen3_moe"))
    first = _moe_blocks(adapter)[0]
    assert first == 0  # its inputs are the embeddings, which no quantization changes
    batches = _batches(n=8, seq=32)
    block = adapter.block_list()[0]
    gate, up, _ = adapter.expert_linears
    inputs = {e: [] for e in range(4)}
    idx = []
    hooks = [block.mlp.gate.register_forward_hook(lambda m, i, out: idx.append(out[2].reshape(-1, 2))),
             block.mlp.register_forward_pre_hook(lambda m, i: inputs.setdefault("x", []).append(i[0]))]
    _logits(model, batches)
    for h in hooks:
        h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs["x"]]).float()
    chosen = torch.cat(idx)
    args = QuantArgs.from_cfg(_spec(W4))
    opts = GPTQOptions(true_sequential=False, actorder=True)
    want = {}
    for e in range(4):
        xe = x if all_experts else x[(chosen == e).any(-1)]
        H = 2 * xe.T @ xe / xe.shape[0]
        for name in (gate, up):
            W = block.mlp.experts[e].get_submodule(name).weight.detach()
            want[(e, name)] = gptq_quantize(W, H.clone(), args, opts)[0]
    quantize_blocks(model, adapter, GPTQ(args, None, opts), batches, set(), RunContext(), False,
                    all_experts=all_experts)
    for (e, name), Q in want.items():
        got = adapter.block_list()[0].mlp.experts[e].get_submodule(name).weight.detach()
        assert torch.allclose(got, Q, atol=1e-5), (e, name, (got - Q).abs().max())


def test_an_expert_without_routed_tokens_stops_routed_only_calibration():
    model, adapter = _unfused(_fused("qwen3_moe"))
    block = adapter.block_list()[0]

    def never_three(m, inp, out):  # the router never picks expert 3
        logits = out[0].clone()
        logits[:, 3] = -1e9
        w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
        return logits, w / w.sum(-1, keepdim=True), idx

    block.mlp.gate.register_forward_hook(never_three)
    algo = GPTQ(QuantArgs.from_cfg(_spec(W4)), None, GPTQOptions())
    with pytest.raises(UserError, match=r"experts \[3\] received no calibration token"):
        quantize_blocks(model, adapter, algo, _batches(), set(), RunContext(), False, all_experts=False)
    model, adapter = _unfused(_fused("qwen3_moe"))
    adapter.block_list()[0].mlp.gate.register_forward_hook(never_three)
    quantize_blocks(model, adapter, algo, _batches(), set(), RunContext(), False, all_experts=True)
    assert isinstance(adapter.block_list()[0].mlp.experts[3].gate_proj, QuantLinear)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fake_quant_save_reloads_fused_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from llmc.export.save import save_fake_quant
    from tiny import make_tokenizer

    model, adapter = _unfused(_fused(family))
    quantize_blocks(model, adapter, RTN(QuantArgs.from_cfg(_spec(W4)), None, Options()), None, set(),
                    RunContext(), False)
    batches = _batches()
    fake = _logits(model, batches)
    save_fake_quant(model, make_tokenizer(), tmp_path / "fq")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "fq", dtype=torch.float32).eval()
    back.config._experts_implementation = "eager"
    layer = back.model.layers[_moe_blocks(adapter)[0]].mlp.experts
    assert layer.gate_up_proj.dim() == 3  # transformers fused the per-expert checkpoint again
    torch.testing.assert_close(_logits(back, batches), fake, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_dry_run_lists_every_expert(make_config, tiny_dir, capsys, family):
    assert main(["--config", make_config(family=family), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for e in range(4):
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert f"mlp.experts.{e}.{n}" in out
    assert "float readers mlp.gate" in out


@pytest.mark.parametrize("family,method", zip(MOE_FAMILIES, ["Awq", "GPTQ", "Awq", "GPTQ", "Awq"]))
def test_cli_runs_moe_families(make_config, wiki_files, family, method):
    """The whole run (AWQ under the fold guard: every fold keeps the float block, router included)."""
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2}
    path = make_config({"calib": calib, "quant": {"method": method, "weight": W4}}, family=family)
    assert main(["--config", path]) == 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_offloaded_run_reads_per_expert_tensors_and_matches_in_memory(make_config, wiki_files, tmp_path, family):
    """model.offload: disk builds unfused blocks on meta and fills each expert's linears from the
    checkpoint's per-expert tensors (Mixtral's under block_sparse_moe): same PPL as the in-memory run."""
    from conftest import read_results

    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2}
    ppl = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        path = make_config({"calib": calib, "model": {"offload": offload},
                            "quant": {"method": "GPTQ", "weight": W4}, "save": {"save_path": str(out)}},
                           family=family, name=f"{offload}.yml")
        assert main(["--config", path]) == 0
        ppl[offload] = [e["ppl"] for e in read_results(out / "results.json")["evals"]]
    assert ppl["disk"] == pytest.approx(ppl["none"], rel=1e-5)


def test_routers_stay_float_unless_opted_in_by_name(make_config, tmp_path, capsys):
    """quant.quantize_gates puts the named routers on the weight quantizer's grid (RTN, computed here);
    the others, and every router by default, keep their float weights; an unknown name is refused."""
    from safetensors.torch import load_file

    def run(gates, name):
        cfg = make_config({"quant": {"quantize_gates": gates}, "save": {"save_fake": True,
                                                                       "save_path": str(tmp_path / name)}},
                          family="qwen2_moe", name=f"{name}.yml")
        assert main(["--config", cfg]) == 0
        out = {}
        for f in (tmp_path / name / "fake_quant_model").glob("*.safetensors"):
            out.update(load_file(f))
        return out

    plain, opted = run([], "plain"), run(["mlp.shared_expert_gate"], "opted")
    original = dict(make_model("qwen2_moe").named_parameters())
    for key in [k for k in plain if k.endswith("shared_expert_gate.weight") or k.endswith("mlp.gate.weight")]:
        assert torch.equal(plain[key], original[key].detach()), key  # float by default
        if "shared_expert_gate" in key:
            w = original[key].detach().reshape(-1, 32)  # the tiny config's group of 32, asymmetric 4 bits
            lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
            scale = (hi - lo) / 15
            zero = torch.round(-lo / scale)
            rtn = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
            torch.testing.assert_close(opted[key], rtn.reshape(opted[key].shape), atol=1e-6, rtol=0)
        else:
            assert torch.equal(opted[key], original[key].detach()), key
    cfg = make_config({"quant": {"quantize_gates": ["mlp.router"]}}, family="qwen2_moe", name="bad.yml")
    assert main(["--config", cfg, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "quant.quantize_gates" in err and "mlp.shared_expert_gate" in err
