"""OmniQuant (Shao et al., 2024): per block, learn weight clipping factors (LWC) and equivalent
transformations (LET: per-channel scales and shifts in front of each subset) with AdamW, minimising the
MSE between the quantized block's output and the float block's output on the float stream (plus, with
`aug_loss`, the float block's output on the block's own inputs); then fold everything into the weights.

LWC starts as the reference's (bounds sigmoid(4)·[min, max] per row), or with weight `calib_algo: mse` at
the mse-searched range. LLMC's hand-off: LWC may start from AWQ's clips (`load_clip` + `clip_path`, or
`search_clip_init` to run AWQ's clip search here; linears without a clip start at their full range, as
AWQ left them) and LET from saved AWQ/SmoothQuant scales (`search_scale_init` + `scale_path`), so a few
epochs suffice; with `epochs: 0` the fake-quant weights are AWQ's bit for bit.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional

import torch
from loguru import logger
from pydantic import Field
from torch import nn

from llmc.algorithms.awq import clip_search
from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import channel_ranges, fold_plan
from llmc.algorithms.smoothquant import smoothing_scales
from llmc.engine.block import block_output
from llmc.errors import ConfigError, UserError
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.learnable import LearnableClip, add_let, fold_let
from llmc.registry import ALGORITHMS


class OmniQuantOptions(Options):
    lwc: bool = True
    let: bool = False
    lwc_lr: float = 0.01
    let_lr: float = 0.005
    wd: float = 0.0
    epochs: int = Field(5, ge=0)
    aug_loss: bool = False
    alpha: float = 0.5
    use_shift: bool = False
    smooth_up_down: bool = False           # LET also between up_proj and down_proj (LLMC key)
    deactive_amp: bool = True              # LLMC key: True trains in float32
    search_clip_init: bool = False
    load_clip: bool = False
    clip_path: Optional[str] = None
    search_scale_init: bool = False
    scale_path: Optional[str] = None
    on_nan: Literal["restore", "fail"] = "restore"
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512

    def inputs(self) -> dict[str, str]:
        out = {}
        if self.load_clip:
            out["clips"] = self.clip_path
        if self.search_scale_init:
            out["scales"] = self.scale_path
        return out


@ALGORITHMS.register("OmniQuant")
class OmniQuant(Algorithm):
    name = "OmniQuant"
    keeps_float = True  # float weights change only by folds (LWC moves the grid, not the weights)
    folds = True
    Options = OmniQuantOptions
    data_driven = True
    needs_targets = True
    weight_calib_algos = ("learnable",)
    mixes_bits = True  # LWC learns each linear's clip on its own grid

    def __init__(self, wargs, aargs, options):
        # Straight-through rounding while training (inference rounds plainly: no gradient is asked for).
        super().__init__(replace(wargs, ste=True) if wargs else None, replace(aargs, ste=True) if aargs else None,
                         options)

    @classmethod
    def check(cls, config) -> None:
        opts = OmniQuantOptions.model_validate(config.quant.special)
        if config.quant.weight is None:
            raise ConfigError("quant.weight", "OmniQuant learns weight clipping: a weight section is required")
        if opts.epochs > 0 and not (opts.lwc or opts.let):
            raise ConfigError("quant.special.epochs", f"{opts.epochs} epochs with lwc and let both False: nothing to learn")
        if opts.search_scale_init and not opts.let:
            raise ConfigError("quant.special.search_scale_init", "initialises LET scales: set let: True")
        if not config.quant.quant_out:
            logger.info("OmniQuant with quant_out: False: each block trains on float inputs")

    # ---- the block transform ----------------------------------------------------------------------
    def apply(self, job, targets):
        opts: OmniQuantOptions = self.options
        aug = job.forward() if opts.aug_loss else None  # the float block on this block's own inputs
        plans = self._let_plans(job) if opts.let else []
        need_inputs = sorted({s.input for s in job.subsets})
        feats = job.capture(need_inputs) if opts.search_clip_init and not opts.load_clip else None
        lo, hi = channel_ranges(job, need_inputs, feats) if plans else ({}, {})
        qlinears = self.install_all(job)
        let_params, divisors = self._add_let(job, plans, lo, hi)
        lwc_params = self._add_lwc(job, qlinears, feats, divisors)
        for p in job.block.parameters():
            p.requires_grad_(False)
        for p in lwc_params + let_params:
            p.requires_grad_(True)
        self._train(job, targets, aug, lwc_params if opts.lwc else [], let_params)
        for p in lwc_params + let_params:
            p.requires_grad_(False)
        fold_let(list(job.block.modules()))
        for q in qlinears.values():
            q.freeze_lwc()
        self.calibrate_static_acts(job, qlinears)
        return {}

    # ---- LET ------------------------------------------------------------------------------------
    def _let_plans(self, job):
        """Subsets LET transforms: those behind a norm, v→o (a linear with only attention in between), the
        ones behind other linears with smooth_up_down, and every subset a loaded scale file covers."""
        plans = []
        loaded = self.loaded.get("scales", {})
        for subset in job.subsets:
            prev = job.module(subset.prev_op) if subset.prev_op else None
            wanted = (not isinstance(prev, nn.Linear) or subset.shiftable or self.options.smooth_up_down
                      or job.full_name(subset.layers[0]) in loaded)
            if job.quantized_layers(subset) and wanted:
                plans.append(subset)
        return plans

    def _add_let(self, job, plans, lo, hi):
        opts: OmniQuantOptions = self.options
        loaded = self.loaded.get("scales", {})
        params, divisors = [], {}
        for subset in plans:
            fold = fold_plan(job, subset, shift=opts.use_shift)
            if fold is None:
                continue
            x_lo, x_hi = fold.reduce(lo[subset.input], "min"), fold.reduce(hi[subset.input], "max")
            shift = None
            if opts.use_shift and fold.can_shift:
                shift = nn.Parameter((x_hi + x_lo) / 2)
                x_absmax = (x_hi - x_lo) / 2
            else:
                x_absmax = torch.maximum(x_hi.abs(), x_lo.abs())
            key = job.full_name(subset.layers[0])
            if key in loaded:
                s = fold.reduce(loaded[key].float().to(x_absmax.device), "mean")
            else:
                if loaded:
                    logger.info(f"OmniQuant: no saved scale for {key}; LET starts from SmoothQuant statistics")
                w_absmax = fold.reduce(torch.stack([job.module(n).weight.detach().abs().amax(0).float()
                                                    for n in subset.layers]).amax(0), "max")
                s = smoothing_scales(x_absmax, w_absmax, opts.alpha)
            scale = nn.Parameter(s.clone())
            add_let(fold, scale, shift)
            check = getattr(fold, "check", None)  # the fold guard names a wrong fold by its subset
            if check is not None:
                check()
            params += [scale] + ([shift] if shift is not None else [])
            divisors[subset.input] = (fold.expand(scale.detach()), None if shift is None else fold.expand(shift.detach()))
        return params, divisors

    # ---- LWC ------------------------------------------------------------------------------------
    def _add_lwc(self, job, qlinears: dict[str, QuantLinear], feats, divisors) -> list[nn.Parameter]:
        opts: OmniQuantOptions = self.options
        clips = self.loaded.get("clips", {})
        params = []
        for subset in job.subsets:
            for name in job.quantized_layers(subset):
                q = qlinears[name]
                with torch.no_grad():
                    weight = q.weight.detach()  # LET-transformed at its initial value
                full = job.full_name(name)
                wargs = replace(q.wargs, ste=True)  # the linear's own grid (mix_bits), trained straight-through
                if f"{full}.max" in clips:
                    q.lwc = LearnableClip.from_clip(weight, wargs, clips[f"{full}.min"], clips[f"{full}.max"])
                elif feats is not None and name not in job.score_layers:
                    xs = feats[subset.input]
                    if subset.input in divisors:
                        s, z = divisors[subset.input]
                        xs = [(x - z.to(x.dtype)) / s.to(x.dtype) if z is not None else x / s.to(x.dtype) for x in xs]
                    sym = wargs.symmetric
                    c_lo, c_hi = clip_search(weight, xs, wargs, sym, opts.clip_grid, opts.max_shrink,
                                             opts.clip_tokens, job.inputs.token_index, job.ctx.reduce)
                    q.lwc = LearnableClip.from_clip(weight, wargs, c_lo, c_hi)
                elif clips or feats is not None or wargs.calib_algo == "mse" or not opts.lwc:
                    # the quantizer's own range (minmax or mse): where AWQ left q/k, and all of LWC's
                    # grid when LWC is off
                    q.lwc = LearnableClip.from_range(weight, wargs)
                else:
                    q.lwc = LearnableClip(weight, wargs)  # the reference's start, sigmoid(4)
                params += [p for p in q.lwc.parameters()]
        if clips and not any(f"{job.full_name(n)}.max" in clips for n in qlinears):
            raise UserError(f"OmniQuant: the clip file has no entry for any linear of {job.name} "
                            "(keys are full module names such as model.layers.0.mlp.down_proj.max)")
        return params

    # ---- training -------------------------------------------------------------------------------
    def _train(self, job, targets, aug, lwc_params, let_params) -> None:
        opts: OmniQuantOptions = self.options
        ctx = job.ctx
        groups = [g for g in ({"params": lwc_params, "lr": opts.lwc_lr}, {"params": let_params, "lr": opts.let_lr})
                  if g["params"]]
        if not groups or opts.epochs == 0:
            return
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=opts.wd)
        low_bits = all(isinstance(a.bit, int) and a.bit < 8 for a in (self.wargs, self.aargs) if a is not None)
        amp = not opts.deactive_amp and low_bits and ctx.compute_dtype != torch.float32  # no AMP at 8 bits
        good = [p.detach().clone() for p in params]
        for epoch in range(opts.epochs):
            total, steps = 0.0, 0
            for b, h in enumerate(job.inputs.hidden):
                args, kwargs = job.inputs.call(job.index, b)
                with torch.autocast(ctx.device.type, dtype=ctx.compute_dtype, enabled=amp):
                    out = block_output(job.block(h.to(ctx.device), *args, **kwargs)).float()
                loss = nn.functional.mse_loss(out, targets[b].to(ctx.device).float())
                if aug is not None:
                    loss = loss + nn.functional.mse_loss(out, aug[b].to(ctx.device).float())
                finite = torch.isfinite(loss)
                if ctx.world_size > 1:  # every rank must take the same branch
                    finite = ctx.reduce(finite.float(), "min") > 0
                if not finite:
                    self._on_nan(job, epoch, b, params, good)
                    return
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if ctx.world_size > 1:  # the gradient of the whole batch's mean loss: shares weighted by size
                    rows = torch.tensor(float(h.shape[0]), device=ctx.device)
                    weight = rows / ctx.reduce(rows)
                    for p in params:
                        if p.grad is not None:
                            p.grad = ctx.reduce(p.grad * weight)
                optimizer.step()
                with torch.no_grad():
                    for g, p in zip(good, params):
                        g.copy_(p)
                total, steps = total + loss.item(), steps + 1
            logger.debug(f"OmniQuant {job.name} epoch {epoch}: loss {total / max(steps, 1):.6g}")

    def _on_nan(self, job, epoch: int, batch: int, params, good) -> None:
        with torch.no_grad():
            for g, p in zip(good, params):
                p.copy_(g)
        where = f"OmniQuant {job.name}: non-finite loss at epoch {epoch}, batch {batch}"
        if self.options.on_nan == "fail":
            raise UserError(f"{where} (quant.special.on_nan: fail)")
        logger.warning(f"{where}; restored the last good parameters and stopped this block's training")
