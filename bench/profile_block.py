"""Profile one block of an algorithm on the real model: where its quantization time goes.

    python bench/profile_block.py CONFIG [--block 3] [--set key=value ...] [--profile [--top 25]]

Loads the model and calibration data as a run would, carries the calibration inputs through the float
blocks before `--block`, then runs the algorithm's transform on that block and the engine's forward after it, and prints
the seconds of each phase: the block forwards the algorithm asks for, its own math, and the forward
that makes the next block's inputs. With --profile, also the top operators by self CPU time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from llmc.config.checks import algorithm_options  # noqa: E402
from llmc.config.loader import load_config  # noqa: E402
from llmc.data import batch_samples, load_calib_samples  # noqa: E402
from llmc.engine.block import BlockJob  # noqa: E402
from llmc.engine.capture import capture_block_inputs  # noqa: E402
from llmc.engine.context import RunContext  # noqa: E402
from llmc.models import adapter_class, load_model, pick_device  # noqa: E402
from llmc.quant.quantizer import QuantArgs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--profile", action="store_true", help="also run apply under torch.profiler (slower)")
    a = p.parse_args()
    config = load_config(a.config, a.set)
    ctx = RunContext.from_config(config, pick_device(None))
    algo_cls, options = algorithm_options(config)
    algorithm = algo_cls(QuantArgs.from_cfg(config.quant.weight), QuantArgs.from_cfg(config.quant.act), options)
    model, tokenizer = load_model(config.model, ctx.device)
    adapter = adapter_class(model.config.model_type, config.model.type)(model)
    batches = batch_samples(load_calib_samples(config.calib, tokenizer), config.calib.bs)
    inputs = capture_block_inputs(model, adapter, batches, ctx)
    blocks = adapter.block_list()

    def job(i: int) -> BlockJob:
        return BlockJob(i, adapter.block_name(i), blocks[i], adapter.block_subsets(i), inputs, set(), ctx,
                        adapter.head_dim(), adapter.score_layers)

    for i in range(a.block):
        inputs.hidden = job(i).forward()
    j = job(a.block)
    targets = j.forward() if algorithm.needs_targets else None
    spent = {"collect": 0.0, "capture": 0.0, "forward": 0.0}
    for method in spent:  # time the block forwards the algorithm asks for; the rest of apply is its own math
        setattr(j, method, timed(getattr(j, method), spent, method))
    start = time.perf_counter()
    if a.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            algorithm.apply(j, targets)
    else:
        algorithm.apply(j, targets)
    apply_s = time.perf_counter() - start
    for method in spent:  # the engine's own forward below is not the algorithm's
        delattr(j, method)
    start = time.perf_counter()
    if config.quant.quant_out:  # the engine's forward that makes the next block's inputs
        j.forward()
    next_s = time.perf_counter() - start
    print(f"{algo_cls.name} block {a.block}: {len(batches)} batches x {batches[0].shape[0]} x {batches[0].shape[1]} "
          f"tokens, compute dtype {config.model.compute_dtype}{' (under the profiler)' if a.profile else ''}")
    forwards = sum(spent.values())
    rows = [("block forwards inside apply (collect / capture / forward)",
             f"{forwards:.2f} ({spent['collect']:.2f} / {spent['capture']:.2f} / {spent['forward']:.2f})"),
            ("algorithm math (the rest of apply)", f"{apply_s - forwards:.2f}"),
            ("quant_out forward (next block's inputs)", f"{next_s:.2f}"),
            ("block total", f"{apply_s + next_s:.2f}")]
    print("\n".join(f"| {k} | {v} |" for k, v in [("phase", "seconds"), ("---", "---"), *rows]))
    if a.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


def timed(fn, spent: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
    return wrapper

if __name__ == "__main__":
    main()
