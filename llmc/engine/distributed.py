"""Data-parallel calibration on torch.distributed, launched by torchrun.

Every process runs the same blockwise pass on its share of each calibration batch (rank r takes rows
r, r + N, ... of every batch), so one optimisation step still sees the whole batch, as in one process.
Statistics are summed through `RunContext.reduce`; expensive solves are split by owner rank and the
results broadcast. Rank 0 alone logs, evaluates and writes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from loguru import logger

from llmc.errors import ConfigError

# Rank 0 evaluates the float model while the others wait at their first reduction: allow for a long one.
TIMEOUT = timedelta(hours=int(os.environ.get("LLMC_DIST_TIMEOUT_HOURS", "6")))


@dataclass
class Shard:
    rank: int = 0
    world: int = 1


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> tuple[Shard, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); one process: nothing to do."""
    world = launched_world()
    if world == 1:
        return Shard(), device
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    if rank:
        logger.remove()  # rank 0 speaks for the run; other ranks only report errors
        logger.add(sys.stderr, level="ERROR", format=f"rank {rank}: {{message}}")
    return Shard(rank, world), device


def batch_size(bs: int, n_samples: int, world: int, methods: str = "", invariant: bool = False) -> int:
    """The calibration batch size the processes use: `bs` when every batch, the last one included, gives
    each process at least one sample. Otherwise, when the `methods`' results do not depend on how samples
    are batched (`invariant`: sums and maxima over tokens), the smallest larger size that feeds every
    process in every batch, with the same result; else a ConfigError."""
    if world == 1:
        return bs
    given, bs = bs, n_samples if bs == -1 else min(bs, n_samples)  # -1: all samples in one batch
    last = n_samples % bs or bs
    if bs >= world and last >= world:
        return given
    if invariant and n_samples >= world:
        wide = max(bs, world)
        while n_samples % wide and n_samples % wide < world:
            wide += 1
        return min(wide, n_samples)
    if bs < world:
        raise ConfigError("calib.bs", f"{bs} with {world} processes: each process takes a share of every "
                          f"calibration batch; expected bs >= {world} (a multiple of {world} keeps the shares even)"
                          + (f" ({methods} as configured depends on how the samples are batched)"
                             if methods else ""))
    raise ConfigError("calib.n_samples", f"{n_samples} in batches of {bs} leaves a last batch of {last}, "
                      f"fewer than the {world} processes; expected a multiple of {bs}")


def shard_batches(batches: list[torch.Tensor], shard: Shard) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's rows of every batch, and each local batch's global token indices (row-major over all
    samples, as one process would flatten them), so a token subsample can be chosen identically."""
    local, index = [], []
    offset = 0
    for ids in batches:
        rows = torch.arange(shard.rank, ids.shape[0], shard.world)
        local.append(ids[rows])
        seq = ids.shape[1]
        index.append((offset + rows[:, None] * seq + torch.arange(seq)[None]).reshape(-1))
        offset += ids.numel()
    return local, index


def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = tensor.detach().clone().contiguous()
    dist.all_reduce(out, op=ops[op])
    return out


def broadcast_object(obj, src: int):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
