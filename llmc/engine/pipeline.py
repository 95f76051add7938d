"""The engine's data path: calibration batches → block-0 inputs → for each block: collect, transform,
produce the next block's inputs."""
from __future__ import annotations

from typing import Optional

import torch
from loguru import logger
from tqdm import tqdm

from llmc.engine.block import BlockJob
from llmc.engine.capture import BlockInputs, capture_block_inputs
from llmc.models.adapter import get_module


def quantize_blocks(model, adapter, algorithm, batches: Optional[list[torch.Tensor]], ignored: set[str], ctx,
                    quant_out: bool) -> dict:
    """Run `algorithm` over every decoder block in order, one block on the device at a time."""
    inputs = capture_block_inputs(model, adapter, batches, ctx) if batches else None
    state: dict = {}
    blocks = adapter.block_list()
    for i in tqdm(range(len(blocks)), desc=f"{algorithm.name} blocks", unit="block"):
        block = ctx.onload(blocks[i])
        job = BlockJob(i, adapter.block_name(i), block, adapter.subsets, inputs, ignored, ctx, adapter.head_dim(),
                       adapter.score_layers)
        targets = job.forward() if inputs is not None and (algorithm.needs_targets or not quant_out) else None
        for kind, entries in (algorithm.apply(job, targets) or {}).items():
            state.setdefault(kind, {}).update(entries)
        if inputs is not None:
            inputs.hidden = job.forward() if quant_out else targets
        blocks[i] = ctx.offload(block)
    logger.info(f"{algorithm.name}: {len(blocks)} blocks done")
    return state


@torch.no_grad()
def forward_per_block(model, adapter, batches: list[torch.Tensor], ctx) -> list[torch.Tensor]:
    """Final hidden states (after the final norm) with one block on the device at a time."""
    inputs: BlockInputs = capture_block_inputs(model, adapter, batches, ctx)
    blocks = adapter.block_list()
    for i in range(len(blocks)):
        block = ctx.onload(blocks[i])
        inputs.hidden = BlockJob(i, adapter.block_name(i), block, adapter.subsets, inputs, set(), ctx).forward()
        blocks[i] = ctx.offload(block)
    finals = [ctx.onload(get_module(model, name)) for name in adapter.present(adapter.final)]
    outs = []
    for h in inputs.hidden:
        h = h.to(ctx.device)
        for module in finals:
            h = module(h)
        outs.append(h)
    for module in finals:
        ctx.offload(module)
    return outs
