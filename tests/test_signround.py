"""SignRound: its quantizer against auto-round's formula written out, its signed step, the kept best
iteration, mini-batches of samples drawn from any calibration batches, and the config rules."""
import pytest
import torch

from llmc.algorithms.base import Options
from llmc.algorithms.rtn import RTN
from llmc.algorithms.signround import CyclicSampler, LearnedRounding, SignRound, SignRoundOptions
from llmc.cli import main
from llmc.engine.block import BlockJob, block_output
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.engine.pipeline import quantize_blocks
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import quant_linears
from llmc.quant.quantizer import QuantArgs
from tiny import make_model

W3 = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)


def _reference_qdq(w, v, fmin, fmax, bits, group):
    """auto-round's asymmetric quantizer (unsigned codes): range including 0 scaled by the min/max factors,
    scale = (max - min) / (2^b - 1), zp = round(-min / scale), q = clamp(round(w / scale + v) + zp, 0, 2^b - 1)."""
    wg = w.reshape(-1, group)
    wmin = wg.min(-1, keepdim=True).values.clamp(max=0) * fmin
    wmax = wg.max(-1, keepdim=True).values.clamp(min=0) * fmax
    maxq = 2 ** bits - 1
    scale = (wmax - wmin) / maxq
    zp = torch.round(-wmin / scale)
    q = torch.clamp(torch.round(wg / scale + v) + zp, 0, maxq)
    return (scale * (q - zp)).reshape(w.shape)


def test_quantizer_is_auto_rounds_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    r = LearnedRounding(w, W3, tune_minmax=True)
    with torch.no_grad():
        r.v.uniform_(-0.5, 0.5, generator=g)
        r.min_scale.uniform_(0.6, 1.0, generator=g)
        r.max_scale.uniform_(0.6, 1.0, generator=g)
    ours = r.fake_quant(w)
    ref = _reference_qdq(w, r.v.detach(), r.min_scale.detach(), r.max_scale.detach(), 3, 16)
    assert torch.allclose(ours, ref, atol=1e-6)
    weight, scale, zero = r.on_grid(w)  # what the model keeps: the same values, on an ordinary grid
    assert torch.allclose(weight, ref, atol=1e-6)
    assert torch.equal(torch.round(weight.reshape(-1, 16) / scale) + zero,
                       (torch.round(weight.reshape(-1, 16) / scale) + zero).clamp(-4, 3))


def test_gradient_of_the_offset_is_the_straight_through_one():
    """d qdq / d v = scale where the code is not clamped, 0 where it is (round's straight-through estimate)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, generator=g)
    r = LearnedRounding(w, W3, tune_minmax=False)
    upstream = torch.randn(4, 32, generator=g)
    (r.fake_quant(w) * upstream).sum().backward()
    scale, zero = (t.detach() for t in r.qparams())
    code = torch.round(w.reshape(-1, 16) / scale) + zero
    inside = (code >= -4) & (code <= 3)
    assert torch.allclose(r.v.grad, upstream.reshape(-1, 16) * scale * inside, atol=1e-6)


def test_sampler_cycles_through_permutations():
    s = CyclicSampler(10, 4, torch.Generator().manual_seed(0))
    first, second, third = s.next(), s.next(), s.next()
    assert len(set(first + second)) == 8  # no repeat within one permutation
    assert len(third) == 4 and len(set(third)) == 4  # the rest (2) was shorter than a batch: reshuffled


def _batches(model, n, bs, seed=3, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n * bs, length), generator=g)
    return list(ids.split(bs))


def test_mini_batches_of_samples_from_any_batches_match_the_block_on_each_sample():
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    ctx = RunContext()
    inputs = capture_block_inputs(model, adapter, _batches(model, 3, 2), ctx)
    job = BlockJob(0, "model.layers.0", adapter.block_list()[0], adapter.subsets, inputs, set(), ctx)
    picks = [(2, 1), (0, 0), (1, 1)]
    (hidden, args, kwargs, rows), = list(job.sample_batches(picks))
    with torch.no_grad():
        together = block_output(job.block(hidden, *args, **kwargs))
        for k, (b, r) in enumerate(rows):
            a, kw = inputs.call(0, b)
            alone = block_output(job.block(inputs.hidden[b], *a, **kw))[r]
            assert torch.allclose(together[k], alone, atol=1e-5)


def _logit_error(algo, seed=0):
    model, ref = make_model("llama", seed), make_model("llama", seed)
    batches = _batches(model, 8, 2)
    adapter = adapter_class("llama", None)(model)
    quantize_blocks(model, adapter, algo, batches, set(), RunContext(), quant_out=True)
    with torch.no_grad():
        x = torch.cat(batches)
        return (model(x).logits - ref(x).logits).pow(2).mean().item(), model


def test_zero_iterations_is_round_to_nearest_and_training_beats_it():
    rtn, _ = _logit_error(RTN(W3, None, Options()))
    untrained, _ = _logit_error(SignRound(W3, None, SignRoundOptions(iters=0)))
    trained, model = _logit_error(SignRound(W3, None, SignRoundOptions(iters=30, batch_size=4)))
    assert untrained == pytest.approx(rtn, rel=1e-6)
    assert trained < 0.6 * rtn
    for name, q in quant_linears(model):  # every weight on its grid, codes in range
        assert q.lwc is None and q.weight.requires_grad is False
        assert torch.allclose(q.dequantized(), q.weight, atol=1e-6), name
        codes = q.int_weight()
        assert codes.min() >= -4 and codes.max() <= 3


def test_mse_ranges_start_from_rtns_mse_grid():
    """weight calib_algo: mse is honoured: the untrained grid is RTN's mse-searched one, not the min/max one."""
    w3_mse = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16, calib_algo="mse")
    rtn_minmax, _ = _logit_error(RTN(W3, None, Options()))
    rtn_mse, _ = _logit_error(RTN(w3_mse, None, Options()))
    untrained, _ = _logit_error(SignRound(w3_mse, None, SignRoundOptions(iters=0)))
    assert rtn_mse != pytest.approx(rtn_minmax, rel=1e-3)
    assert untrained == pytest.approx(rtn_mse, rel=1e-6)


LR = 0.02  # large enough that the last steps overshoot, small enough that the first ones help


def _losses_of_one_block(monkeypatch, options):
    """The mini-batch loss of every iteration SignRound ran on block 0 of a tiny Llama, the algorithm, the
    block's job and its float targets."""
    losses = []
    real = SignRound._sse

    def spy(self, job, targets, picks):
        sse, count = real(self, job, targets, picks)
        losses.append(sse.item() / count)
        return sse, count

    monkeypatch.setattr(SignRound, "_sse", spy)
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    inputs = capture_block_inputs(model, adapter, _batches(model, 4, 2), RunContext())
    job = BlockJob(0, "model.layers.0", adapter.block_list()[0], adapter.subsets, inputs, set(), RunContext())
    algo, targets = SignRound(W3, None, options), job.forward()
    algo.apply(job, targets)
    return losses, algo, job, targets


def test_the_best_iteration_is_kept(monkeypatch):
    """With a huge lr the last steps wreck the block; the kept parameters are those of the lowest loss."""
    losses, algo, job, targets = _losses_of_one_block(monkeypatch, SignRoundOptions(iters=12, lr=LR, minmax_lr=LR,
                                                                                      batch_size=8))
    # batch_size covers every sample: each iteration's loss is over the same data, so the kept
    # parameters reproduce the minimum exactly
    monkeypatch.undo()
    with torch.no_grad():
        final = algo._loss(job, targets, job.samples()).item()
    best = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < best < len(losses) - 1 and losses[best] < losses[-1]  # neither the start nor the end
    assert final == pytest.approx(losses[best], rel=1e-5)


def test_dynamic_max_gap_stops_a_block_that_stopped_improving(monkeypatch):
    """auto-round's dynamic_max_gap: a block stops `gap` iterations after its last new best; with the
    last iteration kept (not_use_best_mse) there is no best to wait for and every iteration runs."""
    full, *_ = _losses_of_one_block(monkeypatch, SignRoundOptions(iters=12, lr=LR, minmax_lr=LR, batch_size=8))
    # where the rule must stop: the first iteration `gap` past the best loss seen so far
    gap = 1
    stop = next(it for it in range(len(full)) if it - min(range(it + 1), key=full.__getitem__) >= gap)
    assert stop < 11  # the trajectory has a worse step, so the gap ends the block early
    monkeypatch.undo()
    cut, *_ = _losses_of_one_block(monkeypatch, SignRoundOptions(iters=12, lr=LR, minmax_lr=LR, batch_size=8,
                                                             dynamic_max_gap=gap))
    assert cut == pytest.approx(full[:stop + 1], rel=1e-6)  # same trajectory, ended where the rule says
    monkeypatch.undo()
    last, *_ = _losses_of_one_block(monkeypatch, SignRoundOptions(iters=12, lr=LR, minmax_lr=LR, batch_size=8,
                                                              dynamic_max_gap=gap, not_use_best_mse=True))
    assert len(last) == 12

def _cfg(make_config, special, quant=None):
    q = {"method": "SignRound", "special": special}
    q.update(quant or {})
    return make_config({"quant": q, "calib": {"name": "wikitext2", "download": False, "n_samples": 4,
                                              "seq_len": 32, "bs": 2, "preproc": "wikitext2_gptq",
                                              "path": None}})


def test_quant_out_contradicting_enable_quanted_input_is_refused(make_config, wiki_files, capsys):
    cfg = make_config({"quant": {"method": "AutoRound", "quant_out": False, "special": {"iters": 2}},
                       "calib": {"name": "wikitext2", "download": False, "n_samples": 4, "seq_len": 32, "bs": 2,
                                 "preproc": "wikitext2_gptq", "path": wiki_files["valid"]}})
    assert main(["--config", cfg, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "quant.quant_out" in err and "enable_quanted_input" in err


def test_runs_end_to_end_and_reports(make_config, wiki_files, tmp_path):
    cfg = make_config({"quant": {"method": "SignRound", "special": {"iters": 3, "batch_size": 2}},
                       "calib": {"name": "wikitext2", "download": False, "n_samples": 4, "seq_len": 32, "bs": 2,
                                 "preproc": "wikitext2_gptq", "path": wiki_files["valid"]},
                       "save": {"save_fake": True}})
    results = tmp_path / "r.json"
    assert main(["--config", cfg, "--results", str(results)]) == 0
    assert (tmp_path / "out" / "fake_quant_model" / "config.json").is_file()


def test_exports_of_a_signround_model_hold_its_codes(tmp_path):
    """SignRound's result is an ordinary grid: compressed-tensors reloads in transformers to the fake-quant
    logits, and the AutoAWQ and GPTQ files unpack to the fake-quant weights bit for bit (fp16 scales, as
    auto-round stores them)."""
    from transformers import AutoModelForCausalLM

    from llmc.export import compressed
    from test_export_packed import assert_packed_exports_hold
    from tiny import make_tokenizer

    args = QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32, scale_dtype="float16")
    model = make_model("llama")
    adapter = adapter_class("llama", None)(model)
    quantize_blocks(model, adapter, SignRound(args, None, SignRoundOptions(iters=4, batch_size=2)),
                    _batches(model, 2, 2), set(), RunContext(), quant_out=True)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    compressed.save(model, make_tokenizer(), tmp_path / "ct")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(ids).logits
        assert torch.allclose(got, model(ids).logits, atol=1e-5, rtol=0)
    assert_packed_exports_hold(model, tmp_path, group=32)


def test_compiled_training_forward_gives_the_eager_result():
    """enable_torch_compile changes how the block runs, not what it computes: the same kept parameters."""
    eager, m1 = _logit_error(SignRound(W3, None, SignRoundOptions(iters=3, batch_size=4)))
    compiled, m2 = _logit_error(SignRound(W3, None, SignRoundOptions(iters=3, batch_size=4, enable_torch_compile=True)))
    assert compiled == pytest.approx(eager, rel=1e-3)
    same = [torch.equal(a.int_weight(), b.int_weight()) for (_, a), (_, b) in zip(quant_linears(m1), quant_linears(m2))]
    assert sum(same) >= len(same) - 1  # float summation order may flip a sign of a near-zero gradient


def test_compile_without_a_cpu_compiler_runs_eagerly_and_says_so(monkeypatch):
    import shutil as sh

    from loguru import logger

    messages = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    monkeypatch.setattr(sh, "which", lambda name: None)
    try:
        error, _ = _logit_error(SignRound(W3, None, SignRoundOptions(iters=2, batch_size=4, enable_torch_compile=True)))
    finally:
        logger.remove(handle)
    eager, _ = _logit_error(SignRound(W3, None, SignRoundOptions(iters=2, batch_size=4)))
    assert error == pytest.approx(eager, rel=1e-6)
    assert any("no C++ compiler" in m or "none is on PATH" in m for m in messages)
