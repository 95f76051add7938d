"""Learnable pieces of OmniQuant: weight clipping factors (LWC) and equivalent transformations (LET).

LET is expressed with torch parametrizations: a norm's weight becomes w / s, a linear's weight W·s
(columns) or W / s (rows), a bias b + W·z or (b - z) / s. Training sees the transformed tensors on every
forward; `remove_parametrizations(..., leave_parametrized=True)` then folds them into the weights.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmc.quant.quantizer import QuantArgs, grouped, qparams_from_range, quant_dequant, row_range

LWC_INIT = 4.0  # OmniQuant's initial logit: factors are sigmoid(p) / sigmoid(LWC_INIT), exactly 1 at init


class LearnableClip(nn.Module):
    """Per row of grouped(weight): learnable factors on the row's max (and min, asymmetric) through a
    sigmoid. A factor of 1 is the full range (RTN); factors may reach 1/sigmoid(4) ≈ 1.018."""

    def __init__(self, rows: int, args: QuantArgs, up: Optional[torch.Tensor] = None,
                 low: Optional[torch.Tensor] = None, device=None):
        super().__init__()
        self.args = replace(args, ste=True)
        self.up = nn.Parameter(self._logit(up, rows, device))
        self.low = None if args.symmetric else nn.Parameter(self._logit(low, rows, device))

    @staticmethod
    def _logit(factor: Optional[torch.Tensor], rows: int, device) -> torch.Tensor:
        if factor is None:
            return torch.full((rows, 1), LWC_INIT, device=device)
        target = (factor.reshape(rows, 1).float() * torch.sigmoid(torch.tensor(LWC_INIT))).clamp(1e-4, 1 - 1e-6)
        logit = torch.log(target / (1 - target))
        logit[factor.reshape(rows, 1) >= 1] = LWC_INIT  # exactly the full range, not its logit round trip
        return logit.to(device)

    @staticmethod
    def _factor(p: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(p) / torch.sigmoid(torch.full_like(p, LWC_INIT))

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wmin, wmax = row_range(grouped(weight, self.args).float())
        up = self._factor(self.up) * wmax
        low = self._factor(self.low) * wmin if self.low is not None else wmin
        return qparams_from_range(low, up, self.args)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        wg = grouped(weight, self.args).float()
        scale, zero = self.qparams(weight)
        return quant_dequant(wg, scale, zero, self.args).reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def factors_from_range(weight: torch.Tensor, args: QuantArgs, lo: torch.Tensor, hi: torch.Tensor):
        """Initial factors reproducing absolute clip values [lo, hi] (AWQ's clip search) on `weight`."""
        wmin, wmax = row_range(grouped(weight, args).float())
        up = (hi.reshape(wmax.shape).float() / wmax.where(wmax.abs() > 1e-12, torch.ones_like(wmax))).clamp(0, 1)
        low = (lo.reshape(wmin.shape).float() / wmin.where(wmin.abs() > 1e-12, -torch.ones_like(wmin))).clamp(0, 1)
        return up, low


# ---- LET parametrizations --------------------------------------------------------------------------
class _Divide(nn.Module):
    """t / s along dim 0 (a vector, or a weight's rows)."""

    def __init__(self, s: nn.Parameter):
        super().__init__()
        self.s = s

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = positive(self.s).to(t.dtype)
        return t / (s if t.dim() == 1 else s.view(-1, 1))


class _ScaleColumns(nn.Module):
    def __init__(self, s: nn.Parameter, expand):
        super().__init__()
        self.s, self.expand = s, expand

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.expand(positive(self.s)).view(1, -1).to(w.dtype)


class _ShiftBias(nn.Module):
    """b - z (on prev_op's bias, before its division by s)."""

    def __init__(self, z: nn.Parameter):
        super().__init__()
        self.z = z

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b - self.z.to(b.dtype)


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
        for lin in fold.linears:  # before the weight's own scaling: the bias needs W·z with the original W
            parametrize.register_parametrization(lin, "bias", _AbsorbShift(z, lin.weight, fold.expand))
        parametrize.register_parametrization(prev, "bias", _ShiftBias(z))
    parametrize.register_parametrization(prev, "weight", _Divide(s))
    if getattr(prev, "bias", None) is not None:
        parametrize.register_parametrization(prev, "bias", _Divide(s))
    for lin in fold.linears:
        parametrize.register_parametrization(lin, "weight", _ScaleColumns(s, fold.expand))


def fold_let(modules: list[nn.Module]) -> None:
    """Bake every parametrization into plain parameters."""
    for m in modules:
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)

