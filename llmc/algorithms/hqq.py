"""HQQ (Badri & Shaji, 2023, Half-Quadratic Quantization): data-free; per linear, the zero points of the
minmax (or mse) grid are optimised, scales fixed, to minimise the sparsity-promoting lp error
‖W - Q⁻¹(Q(W))‖_p^p (p < 1) by half-quadratic splitting. With W_e the auxiliary error variable:

    W_q = clamp(round(W/s + z)),  W_r = (W_q - z)·s,
    W_e = shrink_p(W - W_r, β)                  (generalised soft-thresholding of the lp prox),
    z   = mean over the group of (W_q - (W - W_e)/s),   β ← κ·β,

stopping when the mean |W - W_r| no longer falls (as the reference, LLMC). Unlike both, the zero
points kept are those whose reconstruction was measured best (the reference returns one update past
it, never measured), so the mean absolute error never exceeds the starting grid's.

`axis` as LLMC: 1 groups along input columns (the usual layout), 0 groups `group_size` output channels
of one input column (LLMC's HQQ axis 0; fake-quant only). With `round_zp: True` (the quantizer's
default) each zero update is rounded to the integer grid, so the result stays exportable; LLMC's HQQ
config sets `round_zp: False`, float zero points (fake-quant only).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from loguru import logger
from pydantic import Field

from llmc.algorithms.base import check_group_divides_out_features, Algorithm, Options
from llmc.errors import ConfigError
from llmc.quant.quantizer import QuantArgs, calibrate, grouped
from llmc.registry import ALGORITHMS


class HQQOptions(Options):
    axis: Literal[0, 1] = 1
    lp_norm: float = Field(0.7, gt=0, le=1)
    beta: float = Field(10.0, gt=0)
    kappa: float = Field(1.01, gt=0)
    iters: int = Field(20, ge=1)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-thresholding operator of the lp prox (p = 1: plain soft thresholding)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def hqq_step(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs, beta: float, p: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One half-quadratic iteration on grouped weights; returns (the zero update, W_r of the given zero)."""
    w_q = torch.clamp(torch.round(wg / scale + zero), args.qmin, args.qmax)
    w_r = (w_q - zero) * scale
    w_e = shrink_lp(wg - w_r, beta, p)
    new_zero = torch.mean(w_q - (wg - w_e) / scale, dim=-1, keepdim=True)
    if args.round_zp:
        new_zero = torch.round(new_zero).clamp(args.qmin, args.qmax)
    return new_zero, w_r


@torch.no_grad()
def hqq_zeros(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs, opts: HQQOptions
              ) -> torch.Tensor:
    """The optimised zero point of every row of grouped weights `wg` (float32), scale fixed."""
    best_zero, best_err = zero, float("inf")
    beta = opts.beta
    for _ in range(opts.iters):
        new_zero, w_r = hqq_step(wg, scale, zero, args, beta, opts.lp_norm)
        err = float((wg - w_r).abs().mean())
        if err >= best_err:
            break
        best_zero, best_err = zero, err
        zero, beta = new_zero, beta * opts.kappa
    return best_zero


@ALGORITHMS.register("HQQ")
class HQQ(Algorithm):
    name = "HQQ"
    batch_invariant = True  # data only for static activations (their min/max)
    Options = HQQOptions
    mixes_bits = True

    @classmethod
    def check(cls, config) -> None:
        HQQOptions.model_validate(config.quant.special)
        w = config.quant.weight
        if w is None:
            raise ConfigError("quant.weight", "HQQ optimises weight zero points: a weight section is required")
        if w.symmetric or isinstance(w.bit, str):
            raise ConfigError("quant.weight.symmetric", f"{w.symmetric} (bit {w.bit}): HQQ optimises zero points, "
                              "which only asymmetric integer grids have; set symmetric: False")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        w = config.quant.weight
        if HQQOptions.model_validate(config.quant.special).axis != 0 or w.granularity != "per_group":
            return
        check_group_divides_out_features(adapter, w.group_size, "with HQQ axis 0 groups run along output channels")

    def apply(self, job, targets):
        opts: HQQOptions = self.options
        # HQQ's own rounding, round(W/s + z), is LLMC's round_zp: False formula; with round_zp the zero
        # is an integer and both formulas agree.
        qlinears = self.install_all(job)
        moved = total = 0
        for q in qlinears.values():
            args = q.wargs  # quant.mix_bits may give a linear its own grid
            w = q.weight.detach().float()
            wg = grouped(w.T if opts.axis == 0 else w, args)
            scale, start = calibrate(wg, args)
            zero = hqq_zeros(wg, scale, start.float(), replace(args, ste=False), opts)
            moved, total = moved + int((zero != start).sum()), total + zero.numel()
            q.set_weight_qparams(scale, zero, axis=opts.axis)
        # an integer zero (round_zp) moves only when the optimum is over half a step away: often never
        logger.info(f"HQQ {job.name}: {moved} of {total} zero points moved from round-to-nearest's")
        self.calibrate_static_acts(job, qlinears)
        return {}
