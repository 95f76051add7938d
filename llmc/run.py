"""A whole run, top to bottom: config → model + adapter → evaluate → calibrate → quantize block by
block → evaluate → save → summary."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Optional

import torch
from loguru import logger

from llmc.config import mix_bits
from llmc.config.auto_mix_bits import quantized_shapes
from llmc.config.checks import algorithm_options, check_against_model
from llmc.config.handoff import check_clip_handoff
from llmc.config.schema import Config
from llmc.data import batch_samples, load_calib_samples, load_eval_text
from llmc.engine import distributed
from llmc.engine.bit_budget import BitBudget
from llmc.engine.checkpoint import FOLDER as CHECKPOINT_FOLDER
from llmc.engine.checkpoint import Checkpoint, config_fingerprint, data_fingerprint, model_fingerprint
from llmc.engine.context import RunContext
from llmc.engine.guard import check_module_finite
from llmc.engine.offload import FOLDER as OFFLOAD_FOLDER
from llmc.engine.offload import BlockStore, tag_blocks, wants_offload
from llmc.engine.pipeline import quantize_blocks
from llmc.errors import ConfigError, UserError
from llmc.evaluation.lm_eval import evaluate_tasks
from llmc.evaluation import packed as packed_eval
from llmc.evaluation import sections as eval_sections
from llmc.evaluation.ppl import perplexity
from llmc.export.packing import packed_exports
from llmc.export.save import install_recorded_rotations, save_fake_quant, save_streamed, save_transformed
from llmc.export.state import architecture_fingerprint, load_state, save_state
from llmc.models import adapter_class, load_hf_config, load_model, meta_model, pick_device, resolve_source
from llmc.models.load import load_model_streamed, load_tokenizer
from llmc.quant.bits import average_bits
from llmc.quant.fake_linear import quant_disabled, unwrap_quant_linears
from llmc.export.lightllm_kv import save_lightllm_kv_calib
from llmc.quant.kv_static import calibrate_kv, static_tensors
from llmc.quant.kvcache import kv_quantized
from llmc.quant.quantizer import QuantArgs
from llmc.report import peak_rss_mb, summary_table, write_results
from llmc import tune


def _writable(path: Path, key: str) -> None:
    """A folder can be created (or written) at `path`: checked before any work, so a run never ends in a
    traceback at save time."""
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"'{path}' is an existing file; expected a folder (it is created if missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(key, f"'{path}': '{parent}' is a file, so no folder can be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, f"'{path}': '{parent}' is not writable")


def _only_unfinished_checkpoint(out: Path) -> bool:
    """The folder holds nothing but a checkpoint in which no block finished (a run that failed early)."""
    ckpt = out / CHECKPOINT_FOLDER
    return ([p.name for p in out.iterdir()] == [CHECKPOINT_FOLDER] and ckpt.is_dir()
            and not any(ckpt.glob("stage*-stream-*.pt")))


def output_dir(config: Config, config_path: Optional[str], overwrite: bool, resume: bool = False) -> Path:
    if config.save.save_path:
        out = Path(config.save.save_path)
        _writable(out, "save.save_path")
        if out.exists() and any(out.iterdir()) and not (overwrite or resume or _only_unfinished_checkpoint(out)):
            hint = (" It holds an unfinished run's checkpoint: pass --resume to continue it."
                    if (out / CHECKPOINT_FOLDER).is_dir() else "")
            raise UserError(f"save.save_path: '{out}' exists and is not empty; pass --overwrite to replace "
                            f"what this run writes there, or choose another save_path.{hint}")
        return out
    if resume:
        raise UserError("--resume needs save.save_path: the checkpoint lives in save_path/.llmc_resume")
    stem = Path(config_path).stem if config_path else "run"
    out = Path("llmc_runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _writable(out, "save.save_path (unset: results go to ./llmc_runs)")
    return out


def seed_everything(seed: int) -> None:
    """base.seed: Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def ignored_names(config: Config, adapter) -> set[str]:
    ig = config.ignored_layers
    if ig is None:
        return set()
    blocks, layers = ig.block_set(), set(ig.layer_names)
    names = set(ig.special_names)
    if blocks or layers:
        for i in range(len(adapter.block_list())):
            for name in adapter.block_linear_names(i):
                if (not blocks or i in blocks) and (not layers or name in layers):
                    names.add(f"{adapter.block_name(i)}.{name}")
    return names


def stored_scales(exports: list, stages: list[Config]) -> None:
    """Formats that store scales in their own dtype (AutoAWQ and GPTQ: float16) get grids found with such
    scales from the start, so the exported checkpoint computes exactly what the fake-quant model evaluated."""
    for stage in stages:
        weight = stage.quant.weight
        asked = {fmt.key: fmt.stored_scale_dtype(QuantArgs.from_cfg(weight)) for fmt in exports}
        wanted = set(asked.values()) - {None}
        if wanted == {"float16", "float16_7bit"}:  # a 7-bit float16 is a float16: one grid serves both
            wanted = {"float16_7bit"}
        if len(wanted) != 1:  # none asked, or formats disagree: leave the config's choice
            continue
        dtype = wanted.pop()
        keys = "/".join(key for key, d in asked.items() if d)
        if weight is not None and weight.scale_dtype is None:
            weight.scale_dtype = dtype
            logger.info(f"{keys}: weight scales rounded to {dtype} as the format stores them "
                        "(set quant.weight.scale_dtype to choose otherwise)")


def run(config: Config, device: Optional[str] = None, config_path: Optional[str] = None,
        results_path: Optional[str] = None, overwrite: bool = False, resume: bool = False) -> dict:
    seed_everything(config.base.seed)
    shard, compute_device = distributed.init(pick_device(device))
    ctx = RunContext.from_config(config, compute_device, shard)
    stages = tune.candidates(config) if config.tune else config.stage_configs()
    for stage in stages:
        if stage.calib is not None:
            parallel_batch_size(stage, shard.world)
    hf_config = load_hf_config(resolve_source(config.model.path, config.model.gguf_file))
    adapter_cls = adapter_class(getattr(hf_config, "model_type", None), config.model.type)
    if config.tune:  # the candidates that fit the model, each checked against the packed formats
        stages = tune.prepare(config, stages, adapter_cls(meta_model(hf_config)), shard.world, resume)
        exports = tune.exports(stages, hf_config)
    else:
        for stage in stages:
            check_against_model(stage, adapter_cls(meta_model(hf_config)))
        check_clip_handoff(stages, adapter_cls(meta_model(hf_config)))
        # a format that cannot store the settings (or the family) refuses now, not after the run
        exports = packed_exports(config, hf_config)
    stored_scales(exports, stages)
    out = output_dir(config, config_path, overwrite or not ctx.is_main, resume)  # rank 0 decides
    if results_path:
        _writable(Path(results_path).parent, "--results")
    logger.info(f"device {ctx.device}, output {out}" + (f", {shard.world} processes" if shard.world > 1 else ""))
    # Data before weights: a calibration or evaluation text that cannot serve stops the run here.
    source = resolve_source(config.model.path, config.model.gguf_file)
    tokenizer = load_tokenizer(source, config.model.tokenizer_mode)
    batches = calibration_batches(config, stages, tokenizer, ctx)
    windows_cache = evaluation_windows(config, tokenizer) if ctx.is_main else {}
    held_out = tune.windows(config, tokenizer) if config.tune else None  # tune's held-out slice
    save = config.save
    ckpt = Checkpoint.open(out / CHECKPOINT_FOLDER if save.save_path and save.checkpoint else None, resume,
                           save.keep_checkpoint, writer=ctx.is_main)
    try:
        return _run_loaded(config, ctx, stages, adapter_cls, exports, out, ckpt, tokenizer, batches, windows_cache,
                           results_path, config_path, held_out)
    except BaseException:
        ckpt.discard_if_unfinished()  # a run that failed before its first block leaves nothing behind
        if ctx.store is not None:
            ctx.store.remove()
        raise


def parallel_batch_size(stage: Config, world: int) -> int:
    """The stage's calib.bs under `world` processes (llmc/engine/distributed.py: batch_size)."""
    algo_cls, _ = algorithm_options(stage)
    act = stage.quant.act
    # static activation ranges by percentile are averaged per batch: they depend on the batching
    by_batch = act is not None and act.static and act.calib_algo != "minmax"
    return distributed.batch_size(stage.calib.bs, stage.calib.n_samples, world, algo_cls.name,
                                  algo_cls.batch_invariant and not by_batch)


def calibration_batches(config: Config, stages: list[Config], tokenizer, ctx) -> list:
    """The calibration batches every stage shares (empty when no stage needs data)."""
    for stage in stages:
        algo_cls, options = algorithm_options(stage)
        wargs, aargs = QuantArgs.from_cfg(stage.quant.weight), QuantArgs.from_cfg(stage.quant.act)
        kv_static = stage.quant.kvcache is not None and stage.quant.kvcache.static
        if algo_cls.needs_calibration(wargs, aargs, options) or kv_static or stage.quant.auto_mix_bits:
            bs = parallel_batch_size(stage, ctx.shard.world)
            if bs != stage.calib.bs:
                logger.info(f"calib.bs {stage.calib.bs} with {ctx.shard.world} processes: {algo_cls.name} sums its "
                            f"statistics over samples, so the processes take them in batches of {bs} (the same "
                            "result as one process)")
            with ctx.timed("calibration data"):
                return batch_samples(load_calib_samples(stage.calib, tokenizer), bs, stage.calib.padding)
    return []


def evaluation_windows(config: Config, tokenizer) -> dict:
    """The data of every evaluation section but lm_eval's (token windows, rows or prompts), by (section, dataset)."""
    data = {}
    for i, ev in enumerate(config.eval):
        if ev.type == "lm_eval" or not ev.eval_pos:
            continue
        prefix = "eval" if len(config.eval) == 1 else f"eval.{i}"
        for name in ev.name:
            data[(i, name)] = eval_sections.prepare(ev, name, tokenizer, prefix)
    return data


def _run_loaded(config: Config, ctx, stages: list[Config], adapter_cls, exports: list, out: Path, ckpt: Checkpoint,
                tokenizer, batches: list, windows_cache: dict, results_path: Optional[str],
                config_path: Optional[str] = None, held_out: Optional[torch.Tensor] = None) -> dict:
    """The run from the model load on: evaluate, quantize stage by stage, evaluate, save, summarise."""
    ckpt.check("config", config_fingerprint(config.model_dump(mode="json")))
    with ctx.timed("load"):
        model, tokenizer = load(config, ctx, adapter_cls, out, tokenizer)
    source = resolve_source(config.model.path, config.model.gguf_file)
    if not source.gguf_file and install_recorded_rotations(model, source.folder):
        logger.info(f"online rotations recorded in {source.folder} re-attached (QuaRot)")
    check_module_finite(model, "", skip=adapter_cls.blocks + "." if ctx.store is not None else "")
    ckpt.check("model", model_fingerprint(model, resolve_source(config.model.path, config.model.gguf_file).folder))
    if batches:
        ckpt.check("calibration data", data_fingerprint(batches))
    adapter = adapter_cls(model)
    evals: list[dict] = []
    references = eval_sections.float_references(config, model, adapter, windows_cache, ctx) if ctx.is_main else {}

    def evaluate(pos: str) -> None:
        for i, ev in enumerate(config.eval if ctx.is_main else []):
            if pos not in ev.eval_pos:
                continue
            if ev.type == "lm_eval":
                with ctx.timed(f"eval {pos} lm_eval"), ctx.dtype(ev.compute_dtype):
                    evals.extend(evaluate_tasks(model, tokenizer, ev, ctx, pos))
                continue
            if ev.type != "ppl":
                for name in ev.name:
                    with ctx.timed(f"eval {pos} {ev.type} {name}"), ctx.dtype(ev.compute_dtype):
                        evals.append(eval_sections.evaluate(model, adapter, tokenizer, ev, name, windows_cache[(i, name)],
                                                            references.get((i, name)), ctx, pos))
                continue
            for name in ev.name:
                windows = windows_cache[(i, name)]
                with ctx.timed(f"eval {pos} {name}"), ctx.dtype(ev.compute_dtype):
                    per_block = ev.inference_per_block or ctx.store is not None  # streamed: blocks from disk
                    ppl = perplexity(model, adapter, windows, ev.bs, ctx, per_block, f"{pos} {name}")
                logger.info(f"{pos} {name}: PPL {ppl:.4f} ({windows.shape[0]} x {ev.seq_len})")
                evals.append({"pos": pos, "dataset": name, "ppl": ppl, "windows": windows.shape[0],
                              "seq_len": ev.seq_len})

    eval_dump = [ev.model_dump(mode="json") for ev in config.eval]
    done = ckpt.saved_evals(eval_dump)
    if done is not None:
        evals.extend(done)
        logger.info(f"pretrain evaluations restored from the checkpoint ({len(done)})")
    else:
        evaluate("pretrain")
        ckpt.save_evals(eval_dump, evals)
    if config.tune:  # every candidate scored; the winner then runs as the one stage
        winner, rows = tune.choose(config, stages, model, adapter, tokenizer, ctx, batches, held_out,
                                   ignored_names(config, adapter))
        evals.extend(rows)
        stages = [winner]
    handed: dict[str, dict] = {}  # state earlier stages found, by kind
    original = snapshot_if_needed(model, stages)
    for i, stage in enumerate(stages):
        if i:
            start_next_stage(model, original, stage)
        state = run_stage(stage, model, adapter, tokenizer, ctx, batches, handed, ignored_names(config, adapter),
                          ckpt, i)
        handed.update(state)
    last = stages[-1]
    if last.quant.kvcache is not None and last.quant.kvcache.static:
        with ctx.timed("kv cache calibration"):
            local = distributed.shard_batches(batches, ctx.shard)[0] if ctx.world_size > 1 else batches
            calibrate_kv(model, adapter, local, ctx, last.quant.kvcache)
    # offloaded blocks are on disk by now: their grids are not at hand
    bits = average_bits(adapter.block_list()) if ctx.store is None else None
    if bits is not None:
        logger.info(f"average bits per weight over the blocks' linears: {bits:.3f}")
    with quant_disabled(model):
        evaluate("transformed")
    with kv_quantized(model, adapter.attention_modules(), last.quant.kvcache):
        evaluate("fake_quant")
    evaluate("fake_quant_wo_kv")
    mismatches = []
    if ctx.is_main:
        save_outputs(config, exports, model, adapter, tokenizer, out, ctx, last.quant.kvcache)
        rows, mismatches = packed_eval.evaluate(config, exports, out, windows_cache, evals, ctx)
        evals.extend(rows)
    if ctx.store is not None:
        ctx.store.remove()
    if not ctx.is_main:
        return {}

    results = {"evals": evals, "timings": ctx.timings, "peak_rss_mb": peak_rss_mb(),
               "config": config.model_dump(mode="json"), "state": {k: len(v) for k, v in handed.items()}, "avg_bits": bits}
    if config.opencompass is not None:
        from llmc.evaluation import opencompass

        results["opencompass"] = opencompass.run(config, config_path, out)
    target = Path(results_path) if results_path else out / "results.json"
    write_results(results, target)
    table = summary_table(evals) if evals else "(no evaluation configured)"
    ckpt.remove()
    bits_line = "" if bits is None else f"\naverage bits per weight {bits:.3f}"
    logger.info(f"summary ({target}):\n{table}{bits_line}\npeak RSS {results['peak_rss_mb']:.0f} MB")
    print(table)
    if mismatches:  # after the results are written, so the table shows both scores
        raise UserError("eval packed: a packed checkpoint does not score what the fake-quant model scored:\n  "
                        + "\n  ".join(mismatches))
    return results


def load(config: Config, ctx, adapter_cls, out: Path, tokenizer=None):
    """(model, tokenizer): whole in memory, or (model.offload) with its blocks streamed from disk; `tokenizer`
    when it is already loaded."""
    source = resolve_source(config.model.path, config.model.gguf_file)
    if not wants_offload(config.model.offload, None if source.gguf_file else source.folder):
        return load_model(config.model, ctx.device, tokenizer)
    model, tokenizer = load_model_streamed(config.model, adapter_cls.blocks, ctx.device, tokenizer)
    adapter = adapter_cls(model)
    tag_blocks(adapter.block_list(), [adapter.block_name(i) for i in range(len(adapter.block_list()))])
    ctx.store = BlockStore(source.folder, out / OFFLOAD_FOLDER / f"rank{ctx.shard.rank}", adapter_cls.checkpoint_renames)
    return model, tokenizer


def save_outputs(config: Config, exports: list, model, adapter, tokenizer, out: Path, ctx, kvcache=None) -> None:
    names = [adapter.block_name(i) for i in range(len(adapter.block_list()))]
    for key, folder, fake in (("save_trans", "transformed_model", False), ("save_fake", "fake_quant_model", True)):
        if not getattr(config.save, key):
            continue
        with ctx.timed(f"save {folder}"):
            kv = kvcache.model_dump() if fake and kvcache is not None else None
            kv_scales = static_tensors(adapter) if kv else {}
            if ctx.store is not None:
                save_streamed(model, tokenizer, out / folder, adapter.block_list(), names, ctx, fake, kv, kv_scales)
            elif fake:
                save_fake_quant(model, tokenizer, out / folder, kv, kv_scales)
            else:
                save_transformed(model, tokenizer, out / folder)
    if config.save.save_lightllm_kv_calib:
        save_lightllm_kv_calib(model, adapter, kvcache, out / config.save.lightllm_kv_cache_name)
    for fmt in exports:
        with ctx.timed(f"save {fmt.folder}"):
            fmt.save(model, tokenizer, out / fmt.folder, recipe=config.model_dump(mode="json"), key=f"save.{fmt.key}")


def run_stage(stage: Config, model, adapter, tokenizer, ctx, batches: list, handed: dict, ignored: set[str],
              ckpt: Checkpoint, index: int) -> dict:
    """One algorithm over every block: state it starts from (handed over in memory, else read from its
    files), calibration data (loaded once, shared by the stages), the blockwise pass, state files."""
    algo_cls, options = algorithm_options(stage)
    wargs, aargs = QuantArgs.from_cfg(stage.quant.weight), QuantArgs.from_cfg(stage.quant.act)
    algorithm = algo_cls(wargs, aargs, options)
    algorithm.gates = tuple(stage.quant.quantize_gates)
    floats, algorithm.layer_args = mix_bits.resolve(stage.quant, adapter)
    algorithm.ignored = ignored = ignored | floats
    for kind, path in options.inputs().items():
        if kind in handed:
            algorithm.loaded[kind] = handed[kind]
            logger.info(f"{algo_cls.name} starts from the {len(handed[kind])} {kind} of the previous stage")
        else:
            algorithm.loaded[kind], header = load_state(path, kind, model)
            logger.info(f"loaded {len(algorithm.loaded[kind])} {kind} from {path} ({header.get('method')})")
    auto = stage.quant.auto_mix_bits  # per-block widths measured on the calibration data
    if auto is not None:
        algorithm.bit_budget = BitBudget(auto, wargs, aargs, quantized_shapes(adapter, ignored))
    if not (algo_cls.needs_calibration(wargs, aargs, options) or auto):
        batches = []
    local, token_index = distributed.shard_batches(batches, ctx.shard) if ctx.world_size > 1 else (batches, None)
    with ctx.timed("quantize"):
        algorithm.prepare_model(model, adapter, ctx, local)
        inputs = (local or None) if auto or algo_cls.needs_block_inputs(wargs, aargs, options) else None
        state = quantize_blocks(model, adapter, algorithm, inputs, ignored, ctx, algo_cls.quant_out(stage.quant), ckpt,
                                index, token_index, stage.calib.calibrate_all_experts if stage.calib else True)
    for kind, path in options.outputs().items() if ctx.is_main else ():
        header = {"method": algo_cls.name, "weight": stage.quant.weight.model_dump() if stage.quant.weight else None,
                  "fingerprint": architecture_fingerprint(model), "folded": True}
        target = save_state(path, kind, state.get(kind, {}), header)
        logger.info(f"saved {len(state.get(kind, {}))} {kind} to {target}")
    return state


def _starts_from_original(stage: Config) -> bool:
    """A stage that starts equivalent transformations from saved scales applies them to the original
    weights (as LLMC's two-step W8A8 recipe does); any other starts from the previous stage's float model."""
    _, options = algorithm_options(stage)
    return "scales" in options.inputs()


def snapshot_if_needed(model, stages: list[Config]) -> Optional[dict]:
    if any(_starts_from_original(s) for s in stages[1:]):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return None


def start_next_stage(model, original: Optional[dict], stage: Config) -> None:
    """Back to plain float linears: the previous stage's transformed weights, or the original ones."""
    unwrap_quant_linears(model)
    if _starts_from_original(stage):
        model.load_state_dict(original)
        logger.info("next stage starts from the original weights (its LET starts from the handed-over scales)")
