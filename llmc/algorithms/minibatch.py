"""Mini-batch training over a block's calibration samples that gives one process's result under data
parallel: every process draws the same global sample indices and works on the samples it holds, and the
summed squared errors, their counts and the gradients are reduced before each step."""
from __future__ import annotations

from typing import Optional

import torch


def sample_ids(job) -> tuple[dict[int, tuple[int, int]], int]:
    """This process's samples (batch, row) by their index among all processes' (one process's row-major
    order: distributed.shard_batches deals the rows of each batch round robin), and the total count."""
    ctx, local = job.ctx, job.samples()
    if ctx.world_size == 1:
        return dict(enumerate(local)), len(local)
    sizes = ctx.reduce(torch.tensor([float(h.shape[0]) for h in job.inputs.hidden])).long()
    starts = torch.cumsum(sizes, 0) - sizes
    rank, world = ctx.shard.rank, ctx.world_size
    return {int(starts[b]) + rank + r * world: (b, r) for b, r in local}, int(sizes.sum())


def backward_mean(ctx, params: list[torch.Tensor], sse: Optional[torch.Tensor], count: int) -> torch.Tensor:
    """Backward of the mean error over the whole mini-batch (sse summed over `count` values on this process,
    None when it holds none of the picks): grads of `params` and the returned mean are every process's."""
    total = ctx.reduce(torch.tensor(float(count))).item() if ctx.world_size > 1 else count
    for p in params:
        p.grad = None
    if sse is not None:
        (sse / total).backward()
    value = sse.detach() / total if sse is not None else torch.zeros(())
    if ctx.world_size > 1:
        value = ctx.reduce(value)
        for p in params:
            p.grad = ctx.reduce(p.grad if p.grad is not None else torch.zeros_like(p))
    return value


def token_batches(rows: list[torch.Tensor], batch_size: int, steps: int, generator: torch.Generator):
    """`steps` batches of calibration rows for a model-level next-token loss: consecutive slices of random
    permutations (a new one appended when fewer than batch_size remain), cut to the batch's shortest row."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        length = min(rows[i].numel() for i in picked)  # rows of one batch share a length
        yield torch.stack([rows[i][:length] for i in picked])
