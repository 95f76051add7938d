"""lm-evaluation-harness tasks on the in-memory model: the model as it stands at an eval position
(quantizers, transforms and KV-cache hooks included) is wrapped in lm-eval's HFLM and scored by
`lm_eval.simple_evaluate`; nothing is saved and reloaded. lm-eval is an optional dependency
(`pip install 'llmc[eval]'`), imported only when a config names an lm_eval section."""
from __future__ import annotations

import copy
import functools
import os
import random
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from loguru import logger

from llmc.errors import ConfigError, UserError
from llmc.registry import did_you_mean

INSTALL = "pip install 'llmc[eval]' (or: pip install lm-eval)"


def _require(key: str = "eval.type"):
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(key, f"lm_eval needs the lm-eval package, which is not installed ({err}); "
                          f"install it with {INSTALL}") from None
    return lm_eval


@functools.lru_cache(maxsize=8)
def task_manager(include_path: Optional[str], defaults: bool):
    """One task index per (folder, with built-ins): lm-eval's built-in index (~14k tasks) takes ~10 s to build."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def manager_for(tasks: tuple[str, ...], include_path: Optional[str]):
    """The smallest index that knows every task: include_path alone when its YAMLs define them all."""
    if include_path:
        local = task_manager(include_path, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager(include_path, True)


def check_section(ev, prefix: str) -> None:
    """Config errors of an lm_eval section, before any weight is loaded."""
    if not ev.tasks:
        raise ConfigError(f"{prefix}.tasks", "is required with type: lm_eval: a list of lm-eval task names "
                          "(tasks of lm-eval itself or defined by the YAMLs in include_path)")
    if ev.inference_per_block:
        raise ConfigError(f"{prefix}.inference_per_block", "True is not supported with type: lm_eval "
                          "(lm-eval runs whole-model forwards)")
    if ev.include_path is not None and not os.path.isdir(ev.include_path):
        raise ConfigError(f"{prefix}.include_path", f"'{ev.include_path}' is not a folder of task YAMLs")
    _require(f"{prefix}.type")
    known = manager_for(tuple(ev.tasks), ev.include_path).all_tasks
    for name in ev.tasks:
        if name not in known:
            where = f"in include_path '{ev.include_path}'" if ev.include_path else "(no include_path set)"
            local = task_manager(ev.include_path, False).all_tasks if ev.include_path else []
            listed = f" Tasks there: {', '.join(local[:20])}." if local else ""
            raise ConfigError(f"{prefix}.tasks", f"unknown lm-eval task '{name}': not found {where} nor among "
                              f"lm-eval's built-in tasks.{listed}{did_you_mean(name, list(local) or known)}")


@contextmanager
def _rng_kept() -> Iterator[None]:
    """simple_evaluate reseeds the global generators; restore them so an lm-eval section never changes
    what later phases (calibration sampling, learned methods) draw."""
    import numpy as np

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def wrap(model, tokenizer, batch_size: int):
    """lm-eval's HF model class around the live model; a copy of the tokenizer, since HFLM may add a pad token."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def run_tasks(lm, ev) -> dict:
    """simple_evaluate with the section's settings; the raw lm-eval results dict."""
    import lm_eval

    tasks = list(ev.tasks)
    with _rng_kept():
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=ev.num_fewshot, limit=ev.limit,
                                      task_manager=manager_for(tuple(tasks), ev.include_path), log_samples=False)
    if out is None:  # lm-eval returns None on non-zero ranks; llmc runs one process
        raise UserError("lm-eval returned no results")
    return out


def rows(results: dict, pos: str) -> list[dict]:
    """One row per (task, metric) of an lm-eval results dict, in the shape of llmc's `evals` list."""
    out = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            out.append({"pos": pos, "type": "lm_eval", "task": task,
                        "metric": metric if filt == "none" else f"{metric} ({filt})", "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                        "num_fewshot": results.get("n-shot", {}).get(task),
                        "samples": results.get("n-samples", {}).get(task, {}).get("effective")})
    return out


@torch.no_grad()
def evaluate_tasks(model, tokenizer, ev, ctx, pos: str) -> list[dict]:
    """The section's tasks on `model` as it is now, on the compute device and in its compute dtype."""
    _require()
    model.to(ctx.device)
    try:
        lm = wrap(model, tokenizer, ev.batch_size or ev.bs)
        with ctx.autocast():
            found = rows(run_tasks(lm, ev), pos)
    finally:
        model.to(ctx.offload_device)
    for r in found:
        logger.info(f"{pos} {r['task']}: {r['metric']} {r['value']:.4f}")
    return found
