"""The engine's data path: calibration batches → block-0 inputs → for each block: collect, transform,
produce the next block's inputs."""
from __future__ import annotations

import time
from typing import Optional

import torch
from loguru import logger
from tqdm import tqdm

from llmc.engine.block import BlockJob
from llmc.engine.capture import BlockInputs, capture_block_inputs
from llmc.engine.checkpoint import Checkpoint
from llmc.engine.guard import FloatCheck, check_activations_finite, check_module_finite
from llmc.models.adapter import get_module
from llmc.models.moe import calibrating, experts_modules, report_routing


def quantize_blocks(model, adapter, algorithm, batches: Optional[list[torch.Tensor]], ignored: set[str], ctx,
                    quant_out: bool, checkpoint: Checkpoint = Checkpoint(None), stage: int = 0,
                    token_index: Optional[list[torch.Tensor]] = None, all_experts: bool = True) -> dict:
    """Run `algorithm` over every decoder block in order, one block on the device at a time.

    With quant_out each block is fed the quantized outputs of the one before; an algorithm that trains
    against float targets (`needs_targets`) then gets the float block's outputs on the float stream,
    which is carried alongside (OmniQuant's fp_inps). Each finished block goes to the checkpoint; on
    resume the blocks it holds are replayed (restored, and run forward to rebuild the next inputs, which
    costs a forward instead of writing every block's activations to disk). The quantize seconds spent
    before an interruption travel with the commits and land in ctx.timings["quantize, before resuming"].

    MoE experts (llmc/models/moe.py) see every calibration token while statistics are collected when
    `all_experts` (calib.calibrate_all_experts), else only the tokens routed to them."""
    with calibrating(model, all_experts):
        return _quantize_blocks(model, adapter, algorithm, batches, ignored, ctx, quant_out, checkpoint, stage,
                                token_index, all_experts)


def _quantize_blocks(model, adapter, algorithm, batches, ignored, ctx, quant_out, checkpoint, stage, token_index,
                     all_experts) -> dict:
    started, earlier = time.perf_counter(), 0.0
    inputs = capture_block_inputs(model, adapter, batches, ctx) if batches else None
    if inputs is not None:
        inputs.token_index = token_index
    reference = None  # float-stream inputs, carried only when they differ from inputs.hidden
    state: dict = {}
    blocks = adapter.block_list()
    resumed = checkpoint.finished(stage)
    if resumed:
        logger.info(f"{algorithm.name}: replaying blocks 0-{resumed - 1} from the checkpoint")
    for i in tqdm(range(len(blocks)), desc=f"{algorithm.name} blocks", unit="block", disable=not ctx.is_main):
        block = ctx.onload(blocks[i])
        name = adapter.block_name(i)
        job = BlockJob(i, name, block, adapter.block_subsets(i), inputs, ignored, ctx, adapter.head_dim(),
                       adapter.score_layers, n_blocks=len(blocks))
        if i >= resumed:
            if ctx.store is not None:  # streamed from disk: not checked at load
                check_module_finite(block, name)
            if inputs is not None:
                check_activations_finite(inputs.hidden, f"the activations entering {name}"
                                         + (f" (block {i - 1}'s quantized outputs)" if quant_out and i else ""))
        targets = job.forward(reference) if inputs is not None and (algorithm.needs_targets or not quant_out) else None
        if targets is not None and i >= resumed:
            check_activations_finite(targets, f"the float outputs of {name}")
        if inputs is not None and i >= resumed and experts_modules(block):
            if targets is None:  # the routing is counted on a float forward
                job.forward()
            report_routing(block, name, all_experts)
        if inputs is not None and algorithm.folds and ctx.check_folds and i >= resumed:
            args, kwargs = inputs.call(i, 0)
            job.float_check = FloatCheck(block, inputs.hidden[0], args, kwargs, ctx.device, name)
        if i < resumed:
            ctx.offload(block)  # the float block is done with (a streamed one leaves memory)
            job.block = block = ctx.onload(checkpoint.restore_block(stage, i))
            if i == resumed - 1:
                stream = checkpoint.restore_stream(stage)
                state, earlier = stream["state"], stream.get("seconds", 0.0)
                ctx.timings["quantize, before resuming"] = ctx.timings.get("quantize, before resuming", 0.0) + earlier
        else:
            if algorithm.bit_budget is not None:
                algorithm.layer_args.update(algorithm.bit_budget.allocate(job))
            for kind, entries in (algorithm.apply(job, targets) or {}).items():
                state.setdefault(kind, {}).update(entries)
            if algorithm.keeps_float:  # its only weight changes are folds: the whole block must still agree
                job.check_float(f"{algorithm.name}'s transforms")
            gates = algorithm.quantize_gates(job)  # after the float check: their weights change by design
            if gates:
                logger.info(f"{name}: routers quantized (quant.quantize_gates): {', '.join(gates)}")
            check_module_finite(job.block, name, f"{algorithm.name} produced it on this block")
            job.float_check = None
        if algorithm.bit_budget is not None:
            algorithm.bit_budget.account(job)
        if inputs is not None:
            inputs.hidden = job.forward() if quant_out else targets
            if quant_out and algorithm.needs_targets:
                reference = targets
        if i >= resumed:
            checkpoint.block_done(stage, i, block, {"state": state, "seconds": earlier + time.perf_counter() - started})
        blocks[i] = ctx.offload(block, changed=True)
    logger.info(f"{algorithm.name}: {len(blocks)} blocks done")
    if algorithm.bit_budget is not None:
        logger.info(algorithm.bit_budget.summary())
    return state


@torch.no_grad()
def forward_per_block(model, adapter, batches: list[torch.Tensor], ctx) -> list[torch.Tensor]:
    """Final hidden states (after the final norm) with one block on the device at a time."""
    inputs: BlockInputs = capture_block_inputs(model, adapter, batches, ctx)
    blocks = adapter.block_list()
    for i in range(len(blocks)):
        block = ctx.onload(blocks[i])
        inputs.hidden = BlockJob(i, adapter.block_name(i), block, adapter.block_subsets(i), inputs, set(), ctx).forward()
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
