"""Auto-tune, after Intel Neural Compressor's weight-only tuning: every candidate quant section (`tune.candidates`,
or `builtin`: RTN/GPTQ/AWQ x group sizes, asymmetric) quantizes the same loaded model from its original weights
(a CPU copy of the state dict restores them between candidates), is scored by perplexity on a held-out slice
(`tune.eval`), and the lowest score wins. The run then goes on as a run of the winner alone (quantized again
from the original weights, evaluated at the config's eval positions, saved). Shared by all candidates: the
model load, the tokenized calibration batches and the evaluation windows; each candidate re-captures block 0's
inputs (one embedding pass)."""
from __future__ import annotations

import math
import time

import torch
from loguru import logger

from llmc.config.schema import Config, QuantCfg
from llmc.errors import ConfigError, UserError

BUILTIN_METHODS = ("RTN", "GPTQ", "AWQ")
BUILTIN_BIT, BUILTIN_GROUPS = 4, (32, 128)
REFUSED_METHODS = ("quarot", "spinquant")  # changes the model's structure (untied head, online rotations): no restore


def _builtin(tune) -> list[QuantCfg]:
    bit = tune.bit or BUILTIN_BIT
    return [QuantCfg(method=method, weight={"bit": bit, "symmetric": False, "granularity": "per_group",
                                            "group_size": group})
            for method in BUILTIN_METHODS for group in (tune.group_sizes or BUILTIN_GROUPS)]


def candidates(config: Config) -> list[Config]:
    """One plain config per candidate (its quant section set, tune removed)."""
    tune = config.tune
    quants = _builtin(tune) if tune.candidates == "builtin" else tune.candidates
    return [config.model_copy(update={"quant": q, "tune": None}) for q in quants]


def label(stage: Config) -> str:
    from llmc.quant.quantizer import QuantArgs

    q = stage.quant
    text = f"{q.method} w:{QuantArgs.from_cfg(q.weight).describe() if q.weight else 'float'}"
    return text + (f" a:{QuantArgs.from_cfg(q.act).describe()}" if q.act else "")


def _in_candidate(err: ConfigError, i: int, stage: Config, builtin: bool) -> ConfigError:
    where = "tune.candidates" if builtin else f"tune.candidates.{i}"
    key = err.key.replace("quant", where, 1) if err.key.startswith("quant") else err.key
    message = str(err)[len(err.key) + 2:] if err.key else str(err)
    return ConfigError(key, f"{message} (tune candidate {i}: {label(stage)})")


def check(config: Config) -> None:
    """Config errors of a tune run, before any weight loads: every candidate is checked as its own run."""
    from llmc.config.checks import _check_path, check_config
    from llmc.registry import DATASETS

    import llmc.data  # noqa: F401  (registration)

    if config.model.offload != "none":
        raise ConfigError("model.offload", f"{config.model.offload} with tune: candidates restore the original "
                          "weights from a copy in memory; set offload: none")
    ev = config.tune.eval
    DATASETS.get(ev.name, "tune.eval.name")
    _check_path("tune.eval.path", ev.path, ev.download)
    builtin = config.tune.candidates == "builtin"
    for i, stage in enumerate(candidates(config)):
        _, options = _options(stage, i, builtin)
        if stage.quant.method.lower() in REFUSED_METHODS:
            raise ConfigError("tune.candidates" if builtin else f"tune.candidates.{i}.method",
                              f"{stage.quant.method}: it changes the model's structure, which restoring the "
                              "original weights between candidates does not undo; run it alone with quant")
        if options.outputs():
            raise ConfigError(f"tune.candidates.{i}.special", f"{sorted(options.outputs())}: a candidate writes no "
                              "state files (save_scale/save_clip); run the winner alone with quant to save them")
        try:
            check_config(stage)
        except ConfigError as err:
            raise _in_candidate(err, i, stage, builtin) from None


def _options(stage: Config, i: int, builtin: bool):
    from llmc.config.checks import algorithm_options

    try:
        return algorithm_options(stage)
    except ConfigError as err:
        raise _in_candidate(err, i, stage, builtin) from None


def prepare(config: Config, stages: list[Config], adapter, world: int, resume: bool) -> list[Config]:
    """The candidates that fit the model (shape checks): a listed candidate that does not fit is refused, a
    builtin one is skipped with a log line (the builtin group sizes need not divide every model's widths)."""
    from llmc.config.checks import check_against_model

    if world > 1:
        raise UserError("tune runs in one process: candidates are scored on the main process only (drop --nproc)")
    if resume:
        raise UserError("--resume with tune: a tune run is not resumable; run it again, or the winner alone with quant")
    builtin = config.tune.candidates == "builtin"
    kept = []
    for i, stage in enumerate(stages):
        try:
            check_against_model(stage, adapter)
            kept.append(stage)
        except ConfigError as err:
            if not builtin:
                raise _in_candidate(err, i, stage, builtin) from None
            logger.info(f"tune: builtin candidate {label(stage)} skipped: {err}")
    if not kept:
        raise ConfigError("tune.group_sizes", f"{config.tune.group_sizes or list(BUILTIN_GROUPS)}: no builtin "
                          "candidate fits this model's linears; choose group sizes that divide their widths")
    return kept


def exports(stages: list[Config], hf_config=None) -> list:
    """The packed formats the run saves, checked against every candidate (any of them may win)."""
    from llmc.export.packing import packed_exports

    chosen = []
    for i, stage in enumerate(stages):
        try:
            chosen = packed_exports(stage, hf_config)
        except ConfigError as err:
            raise ConfigError(err.key, f"{str(err)[len(err.key) + 2:]} (tune candidate {i}: {label(stage)})") from None
    return chosen


def windows(config: Config, tokenizer) -> torch.Tensor:
    """The held-out windows, read before any weight loads."""
    from llmc.data import load_eval_text
    from llmc.evaluation.ppl import eval_windows

    ev = config.tune.eval
    text = load_eval_text(ev.name, ev.path, ev.download, "tune.eval")
    try:
        every = eval_windows(tokenizer, text, ev.seq_len, None)
    except ValueError as err:
        raise ConfigError("tune.eval.seq_len", f"{ev.seq_len}: {err}") from None
    end = every.shape[0] if ev.num_samples is None else ev.start + ev.num_samples
    if ev.start >= every.shape[0] or end > every.shape[0]:
        raise ConfigError("tune.eval.start", f"{ev.start} (num_samples {ev.num_samples}): {ev.name} holds "
                          f"{every.shape[0]} windows of {ev.seq_len} tokens")
    return every[ev.start:end]


def choose(config: Config, stages: list[Config], model, adapter, tokenizer, ctx, batches: list,
           held_out: torch.Tensor, ignored: set[str]) -> tuple[Config, list[dict]]:
    """Quantize and score every candidate from the original weights; returns the winner and one summary row per
    candidate. The model is left with its original float weights and the generators reseeded, so the winner
    then runs exactly as it would alone."""
    from llmc.engine.checkpoint import Checkpoint
    from llmc.evaluation.ppl import perplexity
    from llmc.quant.fake_linear import unwrap_quant_linears
    from llmc.quant.kvcache import kv_quantized
    from llmc.run import run_stage, seed_everything

    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ev, rows = config.tune.eval, []
    for i, stage in enumerate(stages):
        name = label(stage)
        seed_everything(config.base.seed)
        before, start = ctx.timings.get("quantize", 0.0), time.perf_counter()
        run_stage(stage, model, adapter, tokenizer, ctx, batches, {}, ignored, Checkpoint(None), 0)
        seconds = time.perf_counter() - start
        ctx.timings["quantize"] = before  # the run's quantize phase is the winner's; candidates are their own
        ctx.timings["tune: quantize candidates"] = ctx.timings.get("tune: quantize candidates", 0.0) + seconds
        with ctx.timed("tune: score candidates"), ctx.dtype(ev.compute_dtype), \
                kv_quantized(model, adapter.attention_modules(), stage.quant.kvcache):
            ppl = perplexity(model, adapter, held_out, ev.bs, ctx, False, f"tune {name}")
        logger.info(f"tune candidate {i} {name}: held-out PPL {ppl:.4f}, quantized in {seconds:.1f} s")
        rows.append({"pos": "tune", "type": "tune", "candidate": name, "dataset": ev.name, "ppl": ppl,
                     "seconds": seconds, "windows": held_out.shape[0], "seq_len": ev.seq_len, "chosen": False})
        unwrap_quant_linears(model)
        model.load_state_dict(original)
    best = min(range(len(rows)), key=lambda j: rows[j]["ppl"] if math.isfinite(rows[j]["ppl"]) else math.inf)
    if not math.isfinite(rows[best]["ppl"]):
        raise UserError("tune: every candidate's held-out PPL is NaN or infinite")
    rows[best]["chosen"] = True
    logger.info(f"tune: {rows[best]['candidate']} wins (held-out PPL {rows[best]['ppl']:.4f}); running it again "
                "from the original weights for the evaluations and outputs")
    seed_everything(config.base.seed)
    return stages[best], rows
