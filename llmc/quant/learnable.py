"""Learnable pieces of OmniQuant: weight clipping factors (LWC) and equivalent transformations (LET).

LET is expressed with torch parametrizations: a norm's weight becomes w / s ((1 + w) / s - 1 for a norm
with a unit offset), a linear's weight W·s (columns) or W / s (rows, or a fused linear's slice of rows),
a bias b + W·z or (b - z) / s. Training sees the transformed tensors on every
forward; `remove_parametrizations(..., leave_parametrized=True)` then folds them into the weights.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmc.quant.quantizer import QuantArgs, grouped, mse_range, qparams_from_range, quant_dequant, row_range

LWC_INIT = 4.0  # OmniQuant's initial logit: from scratch, bounds start at sigmoid(4) ≈ 0.982 of each row's min/max
_LOGIT_MIN = -16.0  # a start at factor 0 (a bound of 0) keeps a finite logit


class LearnableClip(nn.Module):
    """OmniQuant's LWC on each row of grouped(weight): hi = sigmoid(up)·max, lo = sigmoid(low)·min, the
    grid from [lo, hi] (symmetric: absmax = max(|lo|, |hi|), so both factors learn, as in the reference).

    A start other than the reference's (AWQ's clips, an mse-searched range) is exact at step 0 and keeps
    the reference's gradient: bound = sigmoid(p)·w + r, p starts at p0 = logit(b0 / w) and r = b0 -
    sigmoid(p0)·w is a constant buffer. A logit round trip alone is off by an ulp in float32 and moves
    grid points; r is that ulp, computed exactly (Sterbenz: both terms within a factor 2), so sigmoid(p0)·w
    + r == b0 bit for bit. From scratch r = 0 and the bound is the reference's formula itself.

    A start above sigmoid(4)·w (AWQ kept more than 98.2% of a row's range, or all of it) would need a
    saturated logit with no gradient (LLMC's logit(1) = inf freezes such rows); it starts at p0 = 4
    instead, r holding the rest. So that no factor exceeds 1, every bound is capped at the row's own
    min/max, with a straight-through gradient (Adam can still bring a capped factor back)."""

    def __init__(self, weight: torch.Tensor, args: QuantArgs, lo: Optional[torch.Tensor] = None,
                 hi: Optional[torch.Tensor] = None):
        super().__init__()
        self.args = replace(args, ste=True)
        wmin, wmax = row_range(grouped(weight.detach(), self.args).float())
        if hi is None:
            up0 = low0 = torch.full_like(wmax, LWC_INIT)
            r_up = r_low = torch.zeros_like(wmax)
        else:
            up0, r_up = _start(hi.reshape(wmax.shape).to(wmax), wmax)
            low0, r_low = _start(lo.reshape(wmin.shape).to(wmin), wmin)
        self.up, self.low = nn.Parameter(up0), nn.Parameter(low0)
        self.register_buffer("r_up", r_up)
        self.register_buffer("r_low", r_low)

    @classmethod
    def from_clip(cls, weight: torch.Tensor, args: QuantArgs, lo: torch.Tensor, hi: torch.Tensor) -> "LearnableClip":
        """Starts at AWQ's grid for clip values [lo, hi] (AWQ's clip search, one row each): the clipped
        weight's range [max(lo, min), min(hi, max)], as AWQ's quantizer computes it."""
        wmin, wmax = row_range(grouped(weight.detach(), args).float())
        lo, hi = lo.reshape(wmin.shape).to(wmin), hi.reshape(wmax.shape).to(wmax)
        return cls(weight, args, torch.maximum(lo, wmin), torch.minimum(hi, wmax))

    @classmethod
    def from_range(cls, weight: torch.Tensor, args: QuantArgs) -> "LearnableClip":
        """Starts where the quantizer's own calibration puts the grid: the mse-searched range
        (`calib_algo: mse`) or the full range."""
        return cls(weight, args, *start_range(grouped(weight.detach(), args).float(), args))

    def bounds(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wmin, wmax = row_range(grouped(weight, self.args).float())
        return (_capped(torch.sigmoid(self.low) * wmin + self.r_low, wmin),
                _capped(torch.sigmoid(self.up) * wmax + self.r_up, wmax))

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(*self.bounds(weight), self.args)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        wg = grouped(weight, self.args).float()
        scale, zero = self.qparams(weight)
        return quant_dequant(wg, scale, zero, self.args).reshape(weight.shape).to(weight.dtype)


def _start(b0: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p0, r) with sigmoid(p0)·w + r == b0 exactly, for a bound b0 between 0 and the row's w."""
    f = torch.where(w != 0, b0 / torch.where(w != 0, w, torch.ones_like(w)), torch.ones_like(w))
    f = f.clamp(0, 1)
    p0 = torch.where(f < torch.sigmoid(torch.tensor(LWC_INIT)).item(), torch.log(f) - torch.log1p(-f),
                     torch.full_like(f, LWC_INIT)).clamp(min=_LOGIT_MIN)
    return p0, b0 - torch.sigmoid(p0) * w


def _capped(bound: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bound kept between 0 and w (a factor in [0, 1]); the gradient passes straight through."""
    over = bound - torch.minimum(torch.maximum(bound, w.clamp(max=0)), w.clamp(min=0))
    return bound - over.detach()


def start_range(wg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range the quantizer's own calibration puts the grid on: mse-searched or min/max."""
    return mse_range(wg, args) if args.calib_algo == "mse" else row_range(wg)


# ---- LET parametrizations --------------------------------------------------------------------------
class _Divide(nn.Module):
    """t / s along dim 0 (a vector, or a weight's rows), on rows[0]:rows[1] only when given (a fused
    linear's slice); a norm's weight w with a unit offset becomes (offset + w) / s - offset."""

    def __init__(self, s: nn.Parameter, rows: Optional[tuple[int, int]] = None, offset: float = 0.0):
        super().__init__()
        self.s, self.rows, self.offset = s, rows, offset

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = positive(self.s).to(t.dtype)
        if self.rows is not None:
            a, b = self.rows
            return torch.cat([t[:a], self._divide(t[a:b], s), t[b:]])
        return self._divide(t, s)

    def _divide(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if t.dim() > 1:
            return t / s.view(-1, 1)
        return (t + self.offset) / s - self.offset if self.offset else t / s


class _ScaleColumns(nn.Module):
    def __init__(self, s: nn.Parameter, expand):
        super().__init__()
        self.s, self.expand = s, expand

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.expand(positive(self.s)).view(1, -1).to(w.dtype)


class _ShiftBias(nn.Module):
    """b - z (on prev_op's bias, before its division by s; on rows[0]:rows[1] only when given)."""

    def __init__(self, z: nn.Parameter, rows: Optional[tuple[int, int]] = None):
        super().__init__()
        self.z, self.rows = z, rows

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return b - self.z.to(b.dtype)
        a, e = self.rows
        return torch.cat([b[:a], b[a:e] - self.z.to(b.dtype), b[e:]])


class _AbsorbShift(nn.Module):
    """b + W_orig·z on a consuming linear's bias (W before any scaling: W·s applied to (x - z)/s)."""

    def __init__(self, z: nn.Parameter, weight: torch.Tensor, expand):
        super().__init__()
        self.z, self.expand = z, expand
        self.register_buffer("weight", weight.detach().clone(), persistent=False)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + (self.weight.float() @ self.expand(self.z).float()).to(b.dtype)


def positive(s: torch.Tensor) -> torch.Tensor:
    """Scales stay away from 0 (OmniQuant truncates them the same way) with a straight-through gradient."""
    return s + (s.clamp(min=1e-2) - s).detach()


def add_let(fold, s: nn.Parameter, z: Optional[nn.Parameter]) -> None:
    """Parametrize prev_op and the subset's linears so the block computes with scale s (and shift z)."""
    prev = fold.prev
    if z is not None:
        for lin in (*fold.linears, *fold.readers):  # before the weight's own scaling: the bias needs W·z with the original W
            parametrize.register_parametrization(lin, "bias", _AbsorbShift(z, lin.weight, fold.expand))
        parametrize.register_parametrization(prev, "bias", _ShiftBias(z, fold.rows))
    parametrize.register_parametrization(prev, "weight", _Divide(s, fold.rows, fold.offset))
    if getattr(prev, "bias", None) is not None:
        parametrize.register_parametrization(prev, "bias", _Divide(s, fold.rows))
    for lin in (*fold.linears, *fold.readers):  # readers (a MoE router) stay float, scaled to read x/s
        parametrize.register_parametrization(lin, "weight", _ScaleColumns(s, fold.expand))


def fold_let(modules: list[nn.Module]) -> None:
    """Bake every parametrization into plain parameters."""
    for m in modules:
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)

