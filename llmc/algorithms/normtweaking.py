"""Norm Tweaking (Li et al., 2024): quantize a block, then train only its normalisation layers' weights
(and biases) with Adam so the quantized block's output matches the float block's (on the float stream
with quant_out, as LLMC and the paper), one block at a time. The block's learning rate grows with depth,
lr_i = ntweak_lr·(1 + gamma·i/L) (the paper's schedule, LLMC's `adjust_learning_rate`).

The block is quantized first as LLMC does it, round-to-nearest on the configured grid (`weight_method:
RTN`), or with GPTQ as the paper does (`weight_method: GPTQ`, its options under `gptq`); the grid stays
fixed while the norms train. The loss is LLMC's, the mean squared error (`loss: mse`), or the paper's
channel-wise distribution loss (`loss: dist`): the mean over channels of |μ_f - μ_q| + |σ_f - σ_q|,
means and (population) standard deviations over all tokens of the batch.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from loguru import logger
from pydantic import Field
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.gptq import GPTQ, GPTQOptions
from llmc.algorithms.rtn import RTN
from llmc.engine.block import block_output
from llmc.errors import ConfigError
from llmc.registry import ALGORITHMS


class NormTweakingOptions(Options):
    ntweak_lr: float = Field(1e-6, gt=0)
    epochs: int = Field(50, ge=0)
    gamma: float = Field(0.001, ge=0)
    deactive_amp: bool = True  # LLMC key: True trains in float32, False in model.compute_dtype (autocast)
    loss: Literal["mse", "dist"] = "mse"
    weight_method: Literal["RTN", "GPTQ"] = "RTN"
    gptq: Optional[dict[str, Any]] = None  # GPTQ's options, with weight_method: GPTQ


def mse_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def dist_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's channel-wise distribution loss: mean over channels of |Δmean| + |Δstd| over tokens."""
    q, f = out.reshape(-1, out.shape[-1]), target.reshape(-1, target.shape[-1])
    mean_q, mean_f = q.mean(0), f.mean(0)
    std_q, std_f = q.std(0, unbiased=False), f.std(0, unbiased=False)
    return ((mean_f - mean_q).abs() + (std_f - std_q).abs()).mean()


LOSSES = {"mse": mse_loss, "dist": dist_loss}


def norm_modules(block: nn.Module) -> list[nn.Module]:
    """The block's normalisation layers (LayerNorm, RMSNorm of any family): what Norm Tweaking trains."""
    return [m for m in block.modules() if "norm" in type(m).__name__.lower()
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


@ALGORITHMS.register("NormTweaking")
class NormTweaking(Algorithm):
    name = "NormTweaking"
    Options = NormTweakingOptions
    data_driven = True
    needs_targets = True

    @classmethod
    def check(cls, config) -> None:
        opts = NormTweakingOptions.model_validate(config.quant.special)
        if config.quant.weight is None:
            raise ConfigError("quant.weight", "NormTweaking tweaks the norms of a weight-quantized block: a weight "
                              "section is required")
        if opts.gptq is not None and opts.weight_method != "GPTQ":
            raise ConfigError("quant.special.gptq", f"given with weight_method {opts.weight_method}; set weight_method: "
                              "GPTQ or remove gptq")
        if opts.weight_method == "GPTQ":
            from llmc.config.checks import algorithm_options

            algorithm_options(config.model_copy(update={"quant": config.quant.model_copy(
                update={"method": "GPTQ", "special": opts.gptq or {}})}))  # errors name quant.special.<key>
            if (opts.gptq or {}).get("owq"):
                raise ConfigError("quant.special.gptq.owq", "True: OWQ is GPTQ's own option; run GPTQ with owq")

    def __init__(self, wargs, aargs, options):
        super().__init__(wargs, aargs, options)
        base = GPTQ(wargs, aargs, GPTQOptions.model_validate(options.gptq or {})) \
            if options.weight_method == "GPTQ" else RTN(wargs, aargs, Options())
        self.base = base

    def apply(self, job, targets):
        opts: NormTweakingOptions = self.options
        self.base.apply(job, targets)
        norms = norm_modules(job.block)
        if opts.epochs == 0 or not norms:
            return {}
        lr = opts.ntweak_lr * (1 + opts.gamma * job.index / (job.n_blocks or 1))
        dtype = next(job.block.parameters()).dtype
        if opts.deactive_amp:
            job.block.float()
        try:
            before, after = self._train(job, targets, norms, lr)
        finally:
            job.block.to(dtype)
        logger.info(f"NormTweaking {job.name}: lr {lr:.3g}, {opts.loss} loss {before:.6g} -> {after:.6g}")
        return {}

    def _loss(self, job, targets, b: int) -> torch.Tensor:
        ctx = job.ctx
        h = job.inputs.hidden[b]
        args, kwargs = job.inputs.call(job.index, b)
        amp = not self.options.deactive_amp and ctx.compute_dtype != torch.float32
        with torch.autocast(ctx.device.type, dtype=ctx.compute_dtype, enabled=amp):
            dtype = torch.float32 if self.options.deactive_amp else h.dtype
            out = block_output(job.block(h.to(ctx.device, dtype), *args, **kwargs)).float()
        return LOSSES[self.options.loss](out, targets[b].to(ctx.device).float())

    def _mean_loss(self, job, targets) -> float:
        with torch.no_grad():
            return sum(self._loss(job, targets, b).item() for b in range(job.n_batches)) / max(job.n_batches, 1)

    def _train(self, job, targets, norms: list[nn.Module], lr: float) -> tuple[float, float]:
        ctx = job.ctx
        params = [p for m in norms for p in (m.weight, getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
        flags = {p: p.requires_grad for p in job.block.parameters()}
        for p in job.block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        good = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=lr)
        before = self._mean_loss(job, targets)
        try:
            for epoch in range(self.options.epochs):
                for b in range(job.n_batches):
                    loss = self._loss(job, targets, b)
                    finite = torch.isfinite(loss)
                    if ctx.world_size > 1:  # every rank takes the same branch
                        finite = ctx.reduce(finite.float(), "min") > 0
                    if not finite:
                        logger.warning(f"NormTweaking {job.name}: non-finite loss at epoch {epoch}, batch {b}; "
                                       "restored the last good norms and stopped this block's training")
                        with torch.no_grad():
                            for g, p in zip(good, params):
                                p.copy_(g)
                        return before, self._mean_loss(job, targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if ctx.world_size > 1:  # the gradient of the whole batch's mean loss: shares weighted by size
                        rows = torch.tensor(float(job.inputs.hidden[b].shape[0]), device=ctx.device)
                        weight = rows / ctx.reduce(rows)
                        for p in params:
                            if p.grad is not None:
                                p.grad = ctx.reduce(p.grad * weight)
                    optimizer.step()
                    with torch.no_grad():
                        for g, p in zip(good, params):
                            g.copy_(p)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
        return before, self._mean_loss(job, targets)
