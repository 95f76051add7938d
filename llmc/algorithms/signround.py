"""SignRound (Cheng et al., 2023; Intel's auto-round): per block, learn for every weight a rounding
offset v in [-0.5, 0.5] and for every group factors in [0, 1] on its min and max, by signed gradient
descent on the MSE between the quantized block's output and the float block's output.

As auto-round does: mini-batches of `batch_size` calibration samples drawn cyclically from a fresh
permutation, the step lr·sign(grad) with lr decaying linearly to 0 over `iters`, and the parameters of
the iteration with the lowest mini-batch loss kept. With `enable_quanted_input` each block trains on the
previous quantized block's outputs against the float block's outputs on the float stream. The result is
an ordinary grid: the weight is left on it (codes round(w/s + v) + z) with its scales and zeros, so every
exporter packs it as it packs GPTQ's.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Optional

import torch
from loguru import logger
from pydantic import Field
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.minibatch import backward_mean, sample_ids
from llmc.errors import ConfigError
from llmc.quant.learnable import start_range
from llmc.quant.quantizer import QuantArgs, dequantize, grouped, qparams_from_range, quant_dequant
from llmc.registry import ALGORITHMS


class SignRoundOptions(Options):
    iters: int = Field(200, ge=0)
    lr: Optional[float] = Field(None, gt=0)          # None: 1/iters (2/iters at <= 3 bits from 1000 iters)
    minmax_lr: Optional[float] = Field(None, gt=0)   # None: lr
    batch_size: int = Field(8, ge=1)                 # calibration samples per step
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    not_use_best_mse: bool = False                   # keep the last iteration instead of the best one
    dynamic_max_gap: int = -1                        # stop a block after this many iterations without a new best
    enable_torch_compile: bool = False               # auto-round's key: the training forward through torch.compile


class LearnedRounding(nn.Module):
    """One linear's SignRound parameters over grouped(weight): v per weight, min/max factors per row of
    the grid. The grid is qparams_from_range(min·f_min, max·f_max); codes are round(w/s + v) + z. min/max
    are the row's range, or with weight `calib_algo: mse` the range the mse search shrinks it to (so the
    untrained grid is RTN's with the same setting)."""

    def __init__(self, weight: torch.Tensor, args: QuantArgs, tune_minmax: bool):
        super().__init__()
        self.args = replace(args, ste=True)
        wg = grouped(weight.detach(), self.args).float()
        wmin, wmax = start_range(wg, self.args)
        self.register_buffer("wmin", wmin)
        self.register_buffer("wmax", wmax)
        self.v = nn.Parameter(torch.zeros(wg.shape, device=weight.device))
        self.min_scale = nn.Parameter(torch.ones_like(wmin), requires_grad=tune_minmax)
        self.max_scale = nn.Parameter(torch.ones_like(wmax), requires_grad=tune_minmax)

    def qparams(self, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(self.wmin * self.min_scale, self.wmax * self.max_scale, self.args)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        wg = grouped(weight.detach(), self.args).float()
        scale, zero = self.qparams()
        out = _RoundedQDQ.apply(wg, self.v, scale, zero.to(scale.dtype), float(self.args.qmin), float(self.args.qmax))
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.min_scale.clamp_(0.0, 1.0)
        self.max_scale.clamp_(0.0, 1.0)

    @torch.no_grad()
    def on_grid(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dequantized weight, scale, zero): the weight as its codes put it, and the grid."""
        args = replace(self.args, ste=False)
        scale, zero = qparams_from_range(self.wmin * self.min_scale, self.wmax * self.max_scale, args)
        wg = grouped(weight, args).float()
        codes = torch.clamp(torch.round(wg / scale + self.v) + zero, args.qmin, args.qmax)
        return dequantize(codes, scale, zero).reshape(weight.shape).to(weight.dtype), scale, zero


class _RoundedQDQ(torch.autograd.Function):
    """(clamp(round(w/s + v) + z) - z)·s with auto-round's straight-through gradients, in a dozen passes over
    the weight instead of the ~80 autograd records for the same expression (it runs on every weight at
    every step). With t = w/s + v and `inside` where the code was not clamped: v gets g·s inside; s gets
    Σ g·(round(t) - w/s) inside and Σ g·(code - z) outside; z gets -s·Σ g outside (inside, z cancels)."""

    @staticmethod
    def forward(ctx, wg, v, scale, zero, qmin: float, qmax: float):
        t = torch.div(wg, scale).add_(v)
        code = torch.round(t)
        residual = t.sub_(code).neg_().add_(v)  # round(t) - w/s
        code.add_(zero)
        inside = (code >= qmin) & (code <= qmax)
        code.clamp_(qmin, qmax).sub_(zero)
        ctx.save_for_backward(torch.where(inside, residual, code), inside, scale)
        return code.mul_(scale)

    @staticmethod
    def backward(ctx, g):
        coef, inside, scale = ctx.saved_tensors
        outside_sum = g.masked_fill(inside, 0).sum(-1, keepdim=True)
        gv = (g * scale).masked_fill_(~inside, 0) if ctx.needs_input_grad[1] else None
        gscale = (g * coef).sum(-1, keepdim=True) if ctx.needs_input_grad[2] else None
        gzero = -scale * outside_sum if ctx.needs_input_grad[3] else None
        return None, gv, gscale, gzero, None, None


class CyclicSampler:
    """auto-round's sampler: consecutive slices of a random permutation, reshuffled when the rest is
    shorter than a batch."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.gen = n, min(batch, n), generator
        self.order, self.pos = torch.randperm(n, generator=generator), 0

    def next(self) -> list[int]:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        picks = self.order[self.pos:self.pos + self.batch].tolist()
        self.pos += self.batch
        return picks


@ALGORITHMS.register("SignRound", "AutoRound")
class SignRound(Algorithm):
    name = "SignRound"
    Options = SignRoundOptions
    data_driven = True
    needs_targets = True
    mixes_bits = True  # every linear learns its rounding on its own grid

    @classmethod
    def check(cls, config) -> None:
        opts = SignRoundOptions.model_validate(config.quant.special)
        w = config.quant.weight
        if w is None:
            raise ConfigError("quant.weight", "SignRound learns the rounding of weights: a weight section is required")
        if isinstance(w.bit, str) or w.quant_type != "int-quant":
            raise ConfigError("quant.weight", f"bit {w.bit}, quant_type {w.quant_type}: SignRound learns the rounding "
                              "of an integer grid; use an integer bit with quant_type int-quant")
        if "quant_out" in config.quant.model_fields_set and config.quant.quant_out != opts.enable_quanted_input:
            raise ConfigError("quant.quant_out", f"{config.quant.quant_out} contradicts quant.special."
                              f"enable_quanted_input {opts.enable_quanted_input} (the same choice: whether each "
                              "block trains on the previous quantized block's outputs); set one of them")

    def __init__(self, wargs, aargs, options):
        super().__init__(wargs, aargs, options)
        self._forward = None  # the block's training forward (compiled with enable_torch_compile)

    @classmethod
    def quant_out(cls, quant_cfg) -> bool:
        return SignRoundOptions.model_validate(quant_cfg.special).enable_quanted_input

    def learning_rates(self) -> tuple[float, float]:
        opts: SignRoundOptions = self.options
        if opts.lr is not None:
            lr = opts.lr
        else:
            lr = (2.0 if opts.iters >= 1000 and self.wargs.bit <= 3 else 1.0) / max(opts.iters, 1)
        return lr, opts.minmax_lr if opts.minmax_lr is not None else lr

    def apply(self, job, targets):
        opts: SignRoundOptions = self.options
        qlinears = self.install_all(job)
        for p in job.block.parameters():
            p.requires_grad_(False)
        for q in qlinears.values():
            q.lwc = LearnedRounding(q.weight, q.wargs, opts.enable_minmax_tuning)  # mix_bits: its own grid
        if opts.iters > 0:
            self._train(job, targets, qlinears)
        for q in qlinears.values():
            weight, scale, zero = q.lwc.on_grid(q.weight)
            q.lwc = None
            q.weight.data.copy_(weight)
            q.set_weight_qparams(scale, zero)
        self.calibrate_static_acts(job, qlinears)
        return {}

    def _train(self, job, targets, qlinears) -> None:
        opts: SignRoundOptions = self.options
        ctx = job.ctx
        lr, minmax_lr = self.learning_rates()
        rounding = [q.lwc for q in qlinears.values()]
        groups = [([r.v for r in rounding], lr)]
        if opts.enable_minmax_tuning:
            groups.append(([p for r in rounding for p in (r.min_scale, r.max_scale)], minmax_lr))
        params = [p for ps, _ in groups for p in ps]
        self._forward = job.block
        if opts.enable_torch_compile:
            if ctx.device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
                if job.index == 0:
                    logger.warning("SignRound: enable_torch_compile needs a C++ compiler on CPU and none is on PATH; "
                                   "the training forward runs eagerly (same result, slower)")
            else:
                # One compiled graph serves every block (parameters are graph inputs), so only the first pays.
                self._forward = torch.compile(job.block)
        owned, n = sample_ids(job)
        # Every process draws the same global mini-batches (seeded by block) and works on the samples it
        # holds: the summed squared errors and gradients are one process's, whatever the process count.
        sampler = CyclicSampler(n, opts.batch_size, torch.Generator().manual_seed(ctx.seed + job.index))
        best_loss, best, best_iter, first = float("inf"), None, 0, None
        for it in range(opts.iters):
            picks = sampler.next()
            mine = [owned[i] for i in picks if i in owned]
            sse, count = self._sse(job, targets, mine) if mine else (None, 0)
            value = backward_mean(ctx, params, sse, count)
            value = value.item()
            first = value if first is None else first
            if not opts.not_use_best_mse and value < best_loss:
                best_loss, best_iter = value, it
                best = [p.detach().clone() for p in params]
            # auto-round's early stop waits for a new best, so it applies only while the best is tracked
            if not opts.not_use_best_mse and 0 < opts.dynamic_max_gap <= it - best_iter:
                break
            decay = 1.0 - it / opts.iters  # linear decay to 0 over iters, as auto-round's LinearLR
            with torch.no_grad():
                for ps, rate in groups:
                    for p in ps:
                        if p.grad is not None:
                            p.add_(torch.sign(p.grad), alpha=-rate * decay)
            for r in rounding:
                r.clamp_()
        if best is not None:
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        self._forward = None
        kept = "last" if opts.not_use_best_mse else f"best (iter {best_iter})"
        logger.info(f"SignRound {job.name}: loss {first:.6g} at iter 0 -> {best_loss if best else value:.6g} {kept}")

    def _sse(self, job, targets, picks) -> tuple[torch.Tensor, int]:
        """Summed squared error of the quantized block on the picked samples against the float targets,
        and the number of values it sums."""
        total, count = None, 0
        for hidden, args, kwargs, rows in job.sample_batches(picks):
            with job.ctx.autocast():
                out = (job.block if self._forward is None else self._forward)(hidden, *args, **kwargs)
            out = (out[0] if isinstance(out, (tuple, list)) else out).float()
            want = torch.cat([targets[b][r:r + 1] for b, r in rows]).to(out.device).float()
            err = (out - want).pow(2).sum()
            total = err if total is None else total + err
            count += want.numel()
        return total, count

    def _loss(self, job, targets, picks) -> torch.Tensor:
        """Mean squared error on the picked samples (this process's)."""
        sse, count = self._sse(job, targets, picks)
        return sse / count
