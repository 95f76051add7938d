"""TEQ: the straight-through gradient of the scales against its formula on one linear and against a
fold-then-quantize autograd of a whole block, the first Adam step, the fold keeping the float block,
training beating round-to-nearest, and the config rules."""
import copy

import pytest
import torch
from torch import nn

from llmc.algorithms.rtn import RTN
from llmc.algorithms.base import Options
from llmc.algorithms.teq import TEQ, TeqOptions, TeqWeight, lr_factor
from llmc.cli import main
from llmc.engine.block import BlockJob, block_output
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear, quant_disabled
from llmc.quant.quantizer import QuantArgs
from tiny import make_model

W4 = QuantArgs(bit=4, symmetric=True, granularity="per_group", group_size=16)


def _fq(m, group=16, bits=4):
    """Symmetric signed grid written out: scale = absmax / (2^(b-1) - 1/2), codes in [-2^(b-1), 2^(b-1) - 1]."""
    g = m.reshape(-1, group)
    scale = (g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.clamp(torch.round(g / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale).reshape(m.shape)


def _ste(m):
    """INC's estimator: the fake quant is the identity backwards."""
    return m + (_fq(m) - m).detach()


def _round_ste(m, group=16, bits=4):
    """Only the rounding straight-through: the grid's absmax, and so its scale, carry the gradient."""
    g = m.reshape(-1, group)
    scale = (g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)).clamp(min=torch.finfo(torch.float32).eps)
    t = g / scale
    codes = torch.clamp(t + (torch.round(t) - t).detach(), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (codes * scale).reshape(m.shape)


def test_gradient_of_the_scales_on_one_linear_is_the_straight_through_formula():
    """y = R Q(R⁻¹ W C) C⁻¹ x with Q's rounding residual δ = Q(M) - M held fixed: dL/dc_j = -Σ_t (Gᵀ R δ)_tj x_tj / c_j²
    and dL/dr_o = Σ_t G_to (δ C⁻¹ x_t)_o, G = dL/dy."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 32, generator=g))
    w = lin.weight.detach().clone()
    lin.weight.requires_grad_(False)
    c = nn.Parameter(torch.rand(32, generator=g) + 0.5)
    r = nn.Parameter(torch.rand(8, generator=g) + 0.5)
    q = QuantLinear(lin, W4)
    q.lwc = TeqWeight(W4, col=lambda: c, row=lambda: r, estimator="identity")
    x = torch.randn(5, 32, generator=g)
    target = torch.randn(5, 8, generator=g)
    ((q(x) - target) ** 2).sum().backward()

    with torch.no_grad():
        cd, rd = c.detach(), r.detach()
        m = w / rd.view(-1, 1) * cd.view(1, -1)
        delta = _fq(m) - m
        y = (w + rd.view(-1, 1) * delta / cd.view(1, -1)) @ x.T   # [8, 5]
        grad_y = 2 * (y.T - target)                                # [5, 8]
        want_c = -((grad_y @ (rd.view(-1, 1) * delta)) * x).sum(0) / cd ** 2
        want_r = (grad_y * ((x / cd) @ delta.T)).sum(0)
    assert torch.allclose(q(x).detach(), y.T, atol=1e-5)
    assert torch.allclose(c.grad, want_c, rtol=1e-4, atol=1e-5)
    assert torch.allclose(r.grad, want_r, rtol=1e-4, atol=1e-5)


def _job(seed=0, n=4, bs=2, length=24, outliers=False):
    model = make_model("llama", seed)
    if outliers:  # channels with 30x larger activations, as LLMs have: what scales can protect
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[[3, 17, 40]] *= 30
            model.model.layers[0].post_attention_layernorm.weight[[5, 22]] *= 30
    adapter = adapter_class("llama", None)(model)
    ids = torch.randint(0, model.config.vocab_size, (n * bs, length), generator=torch.Generator().manual_seed(3))
    ctx = RunContext()
    inputs = capture_block_inputs(model, adapter, list(ids.split(bs)), ctx)
    job = BlockJob(0, "model.layers.0", adapter.block_list()[0], adapter.subsets, inputs, set(), ctx, head_dim=16)
    return job, job.forward()


def _folded_reference(block, scales, job, _ste=_ste):
    """The block with the scales folded in (norms / s, columns · s, v's and up's rows / s) and every linear
    fake-quantized with a straight-through estimate: autograd through this is TEQ's gradient."""
    s_qkv, s_o, s_gu, s_d = scales
    ref = copy.deepcopy(block)
    a, m = ref.self_attn, ref.mlp
    kv, hd = s_o.numel() // 16, 16
    s_o_full = s_o.view(kv, 1, hd).expand(kv, a.o_proj.in_features // s_o.numel(), hd).reshape(-1)
    weights = {
        "input_layernorm.weight": ref.input_layernorm.weight / s_qkv,
        "post_attention_layernorm.weight": ref.post_attention_layernorm.weight / s_gu,
        "self_attn.q_proj.weight": _ste(a.q_proj.weight * s_qkv),
        "self_attn.k_proj.weight": _ste(a.k_proj.weight * s_qkv),
        # rows divided before columns are multiplied, as TEQ does: the grid's absmax lands on -2^(b-1) - 1/2, a
        # rounding tie that the last bit of a differently ordered product decides
        "self_attn.v_proj.weight": _ste(a.v_proj.weight / s_o.view(-1, 1) * s_qkv),
        "self_attn.o_proj.weight": _ste(a.o_proj.weight * s_o_full),
        "mlp.gate_proj.weight": _ste(m.gate_proj.weight * s_gu),
        "mlp.up_proj.weight": _ste(m.up_proj.weight / s_d.view(-1, 1) * s_gu),
        "mlp.down_proj.weight": _ste(m.down_proj.weight * s_d),
    }
    loss, count = 0.0, 0
    for b, h in enumerate(job.inputs.hidden):
        args, kwargs = job.inputs.call(0, b)
        out = block_output(torch.func.functional_call(ref, weights, (h, *args), kwargs))
        loss = loss + ((out - job._targets[b]) ** 2).sum()
        count += out.numel()
    return loss / count


@pytest.mark.parametrize("estimator, reference", [("identity", _ste), ("round", _round_ste)])
def test_gradient_of_a_block_is_the_fold_then_quantize_gradient(estimator, reference):
    job, targets = _job()
    block = copy.deepcopy(job.block)
    algo = TEQ(W4, None, TeqOptions(estimator=estimator))
    qlinears = algo.install_all(job)
    for p in job.block.parameters():
        p.requires_grad_(False)
    plans = algo._plans(job)
    assert [len(p) for _, _, p in plans] == [64, 32, 64, 128]  # q/k/v, o (on v's 32 channels: GQA), gate/up, down
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, _, p in plans:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    algo._attach(job, qlinears, plans)
    params = [p for _, _, p in plans]
    for p in params:
        p.requires_grad_(True)
    sse, count = algo.sse(job, targets, job.samples())
    (sse / count).backward()

    ref_scales = [p.detach().clone().requires_grad_(True) for p in params]
    job._targets = targets
    ref_loss = _folded_reference(block, ref_scales, job, reference)
    ref_loss.backward()
    assert (sse / count).item() == pytest.approx(ref_loss.item(), rel=1e-4)
    for p, r in zip(params, ref_scales):
        assert torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-6 * r.grad.abs().max().item())


def test_one_adam_step_moves_each_scale_by_lr_against_its_gradient_and_the_fold_keeps_the_float_block():
    """Adam's first step is lr·g/(|g| + eps): each scale moves by lr against the sign of its gradient. The
    scales are then folded: the norms hold γ/s, and the float block computes what it computed before."""
    job, targets = _job()
    block = copy.deepcopy(job.block)
    ln1 = job.block.input_layernorm.weight.detach().clone()
    with torch.no_grad():
        x = job.inputs.hidden[0]
        args, kwargs = job.inputs.call(0, 0)
        before = block_output(block(x, *args, **kwargs))
    ones = [torch.ones(n, requires_grad=True) for n in (64, 32, 64, 128)]
    job._targets = targets
    _folded_reference(block, ones, job).backward()
    lr = 0.01
    TEQ(W4, None, TeqOptions(train_steps=1, lr=lr, warmup_ratio=0, batch_size=8, estimator="identity")).apply(
        job, targets)
    s_qkv = ln1 / job.block.input_layernorm.weight.detach()
    grad = ones[0].grad
    assert torch.allclose(s_qkv, 1 - lr * grad / (grad.abs() + 1e-8), atol=1e-5)
    assert (s_qkv - 1).abs().min() > 0.9 * lr  # every scale moved
    with torch.no_grad(), quant_disabled(job.block):
        after = block_output(job.block(x, *args, **kwargs))
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)


def test_schedule_is_linear_with_warmup():
    assert [lr_factor(k, 10, 2, "linear") for k in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [lr_factor(k, 10, 2, "constant") for k in (0, 1, 5, 9)] == [0.0, 0.5, 1.0, 1.0]


def _block_error(algo):
    job, targets = _job(outliers=True)
    algo.apply(job, targets)
    out = job.forward()
    return sum(((o - t) ** 2).sum() for o, t in zip(out, targets)).item(), job


@pytest.mark.parametrize("estimator", ["identity", "round"])
def test_training_lowers_the_block_error_below_round_to_nearest(estimator):
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)
    rtn, _ = _block_error(RTN(args, None, Options()))
    untrained, _ = _block_error(TEQ(args, None, TeqOptions(train_steps=0, estimator=estimator)))
    trained, job = _block_error(TEQ(args, None, TeqOptions(train_steps=40, lr=0.03, warmup_ratio=0, batch_size=4,
                                                           estimator=estimator)))
    assert untrained == pytest.approx(rtn, rel=1e-5)
    assert trained < 0.85 * rtn
    for name, q in job.block.named_modules():  # an ordinary grid: lwc gone, grid fixed
        if isinstance(q, QuantLinear):
            assert q.lwc is None and q.w_scale is not None and not q.weight.requires_grad


def test_objective_lm_learns_every_blocks_scales_and_keeps_the_float_model():
    """INC's TEQ: the scales of every block learned together on the model's next-token loss with the
    linears fake-quantized, then folded: the float model is unchanged, the plain linears are back, and the
    first Adam step moved every scale by lr (Adam's first step is lr·sign(grad))."""
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)
    model = make_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    adapter = adapter_class("llama", None)(model)
    norms = [layer.input_layernorm.weight.detach().clone() for layer in model.model.layers]
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
    lr = 0.01
    algo = TEQ(args, None, TeqOptions(objective="lm", train_steps=1, lr=lr, warmup_ratio=0, batch_size=8))
    assert not TEQ.needs_block_inputs(args, None, algo.options)
    algo.prepare_model(model, adapter, RunContext(), [ids[:4], ids[4:]])
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear)))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, float_logits, rtol=1e-4, atol=1e-4)
    for before, layer in zip(norms, model.model.layers):  # the qkv scale, folded into the norm as 1/s
        s_qkv = before / layer.input_layernorm.weight.detach()
        assert torch.allclose((s_qkv - 1).abs(), torch.full_like(s_qkv, lr), atol=1e-4)


def test_objective_lm_runs_end_to_end(make_config, wiki_files, tmp_path):
    cfg = _cfg(make_config, wiki_files, {"objective": "lm", "train_steps": 2, "batch_size": 2})
    assert main(["--config", cfg, "--results", str(tmp_path / "r.json")]) == 0


def _cfg(make_config, wiki_files, special, quant=None, save=None):
    q = {"method": "TEQ", "special": special,
         "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 16}}
    q.update(quant or {})
    changes = {"quant": q, "calib": {"name": "wikitext2", "download": False, "n_samples": 4, "seq_len": 32, "bs": 2,
                                     "preproc": "wikitext2_gptq", "path": wiki_files["valid"]}}
    if save:
        changes["save"] = save
    return make_config(changes)


@pytest.mark.parametrize("special, quant, key", [
    ({"lr": 0}, None, "lr"),
    ({"train_step": 3}, None, "train_step"),
    ({"betas": [0.9, 1.5]}, None, "betas"),
    ({"lr_scheduler_type": "cosine"}, None, "lr_scheduler_type"),
    ({"objective": "model"}, None, "objective"),
    ({}, {"act": {"bit": 8, "granularity": "per_token"}}, "quant.act"),
    ({}, {"weight": {"bit": 4, "calib_algo": "learnable"}}, "calib_algo"),
])
def test_bad_keys_are_refused_before_loading(make_config, wiki_files, capsys, special, quant, key):
    cfg = _cfg(make_config, wiki_files, special, quant)
    assert main(["--config", cfg, "--dry-run"]) == 2
    assert key in capsys.readouterr().err


def test_runs_end_to_end(make_config, wiki_files, tmp_path):
    cfg = _cfg(make_config, wiki_files, {"train_steps": 3, "batch_size": 2}, save={"save_fake": True})
    assert main(["--config", cfg, "--dry-run"]) == 0
    assert main(["--config", cfg, "--results", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "out" / "fake_quant_model" / "config.json").is_file()


# ---- RTN's full-range symmetric grid (INC's enable_full_range) ----------------------------------------
def _inc_full_range(w, bits, group):
    """INC's qdq_weight_sym with full_range written out: scale = absmax / 2^(b-1), negated where the row's
    max is larger in magnitude than its min, codes round(w / scale) clamped to [-2^(b-1), 2^(b-1) - 1]."""
    g = w.reshape(-1, group)
    hi, lo = g.max(1).values, g.min(1).values
    scale = torch.maximum(hi.abs(), lo.abs()) / 2 ** (bits - 1)
    scale = torch.where(hi.abs() > lo.abs(), -scale, scale).unsqueeze(1)
    return (torch.clamp(torch.round(g / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale).reshape(w.shape)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_full_range_grid_is_incs_and_keeps_each_groups_absmax(bits):
    from llmc.quant.quantizer import fake_quant

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    args = QuantArgs(bit=bits, symmetric=True, granularity="per_group", group_size=32, full_range=True)
    ours = fake_quant(w, args)
    assert torch.equal(ours, _inc_full_range(w, bits, 32))
    groups, fq = w.reshape(-1, 32), ours.reshape(-1, 32)
    at = groups.abs().argmax(1, keepdim=True)
    assert torch.equal(fq.gather(1, at), groups.gather(1, at))  # the absmax is a grid point: kept exactly
    # the default grid differs: absmax / (2^(b-1) - 1/2)
    assert not torch.equal(fake_quant(w, QuantArgs(bit=bits, granularity="per_group", group_size=32)), ours)


def _rtn_cfg(make_config, wiki_files, weight, special=None, save=None):
    changes = {"quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 16,
                                                    **weight},
                         "special": special or {}}}
    if save:
        changes["save"] = save
    return make_config(changes)


@pytest.mark.parametrize("weight, special, save, key, says", [
    ({"symmetric": False, "full_range": True}, None, None, "full_range", "symmetric"),
    ({}, {"enable_full_range": True}, None, "quant.special.enable_full_range", "quant.weight.full_range: True"),
    ({}, {"enable_mse_search": True}, None, "quant.special.enable_mse_search", "quant.weight.calib_algo: mse"),
    ({"full_range": True}, None, {"save_gptq": True}, "save.save_gptq", "full_range"),
    ({"full_range": True}, None, {"save_vllm": True}, "save.save_vllm", "full_range"),
])
def test_full_range_and_incs_spellings_are_refused_where_they_cannot_apply(make_config, wiki_files, capsys, weight,
                                                                            special, save, key, says):
    cfg = _rtn_cfg(make_config, wiki_files, weight, special, save)
    assert main(["--config", cfg]) == 2  # before any weight loads (packed formats are checked after --dry-run's plan)
    err = capsys.readouterr().err
    assert key in err and says in err


def test_full_range_with_mse_search_runs_and_its_weights_are_on_the_grid(make_config, wiki_files, tmp_path):
    from safetensors.torch import load_file

    cfg = _rtn_cfg(make_config, wiki_files, {"full_range": True, "calib_algo": "mse"}, save={"save_fake": True})
    assert main(["--config", cfg, "--results", str(tmp_path / "r.json")]) == 0
    state = load_file(next((tmp_path / "out" / "fake_quant_model").glob("*.safetensors")))
    w = state["model.layers.0.mlp.down_proj.weight"].reshape(-1, 16)
    # every group is k·s, k integer in [-8, 7], with the signed step s = ∓absmax / 8: the group's absmax (shrunk
    # or not by the mse search) is code -8 itself, on whichever side it lies
    amax = w.abs().amax(1, keepdim=True)
    sign = torch.where(w.amax(1, keepdim=True) >= -w.amin(1, keepdim=True), -1.0, 1.0)
    codes = w / (sign * amax / 8)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().min() == -8 and codes.round().max() <= 7
