"""Two-level integer weights for W4A8: 4-bit group codes over an 8-bit per-channel base.

LLMC's `bit: 48` (its Weight48IntegerQuantizer), computed as LLMC does:
  1. each output channel to 8-bit codes c8 = clamp(round(w / s8) + z8, bit8's range) (`int_range`, e.g.
     [-120, 120]; symmetric s8 = absmax / qmax, asymmetric s8 = (max - min) / (qmax - qmin), z8 = qmin -
     round(min / s8), ranges not widened to include 0);
  2. the 8-bit codes, in groups, to 4-bit codes q4 = clamp(round(c8 / s4) + z4, bit4's range) with the same
     formulas, s4 then clamped into the `scales_bit` integer range and z4 into the `zeros_bit` one (LLMC
     clamps the group scales without rounding them; unsigned [0, 2^b - 1] unless `*_symmetric`);
  3. w ≈ ((q4 - z4) · s4 - z8) · s8.
Codes are LLMC's own (a 4-bit asymmetric range is [0, 15]). DGQ (llmc/algorithms/dgq.py) searches its own
two-level grid and hands QuantLinear codes, scales and zeros directly.

The fake-quant weight is the plain grid (q4 - zero) · scale with scale = s4 · s8 and zero = z4 + z8 / s4 per
group; since q4 comes from c8 (two roundings), the codes are fixed when the grid is set (QuantLinear.w_codes).
No packed export stores these levels (save_fake/save_trans only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

INF = float("inf")


@dataclass(frozen=True)
class Level:
    """One level: its code range, sign, groups (-1: per output channel) and the ranges its scales and zero
    points are clamped into."""

    qmin: float
    qmax: float
    symmetric: bool
    group_size: int = -1
    scales_range: tuple[float, float] = (-INF, INF)
    zeros_range: Optional[tuple[float, float]] = None  # None: the code range

    @classmethod
    def of(cls, bit: int, part) -> "Level":
        """From a bit4/bit8 config section (LLMC's keys)."""
        if part.int_range is not None:
            qmin, qmax = part.int_range
        else:
            qmin, qmax = _int_range(bit, part.symmetric)
        scales = _int_range(part.scales_bit, part.scales_symmetric) if part.scales_bit else (-INF, INF)
        zeros = _int_range(part.zeros_bit, part.zeros_symmetric) if part.zeros_bit else None
        return cls(float(qmin), float(qmax), part.symmetric, part.group_size, scales, zeros)

    def describe(self, bits: int) -> str:
        gran = f"g{self.group_size}" if self.group_size > 0 else "per_channel"
        return f"int{bits} {'sym' if self.symmetric else 'asym'} {gran}"


@dataclass(frozen=True)
class TwoLevel:
    kind: str   # "w48" (LLMC's bit 48, round to nearest) or "dgq" (searched by the DGQ algorithm)
    low: Level  # the 4-bit groups
    high: Level  # the 8-bit per-channel base

    def describe(self, gran: str, symmetric: bool) -> str:
        name = "bit48" if self.kind == "w48" else "DGQ"
        return f"{name}: {self.low.describe(4)} over {self.high.describe(8)}"


def _int_range(bit: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bit - 1)), 2 ** (bit - 1) - 1) if symmetric else (0, 2 ** bit - 1)


def two_level_args(cfg):
    """QuantArgs of a `bit: 48` or DGQ (`w_1`/`w_2`) weight section: the 4-bit group grid plus both levels."""
    from llmc.quant.quantizer import QuantArgs

    if cfg.bit == 48:
        low, high, kind = Level.of(4, cfg.bit4), Level.of(8, cfg.bit8), "w48"
    else:
        w1, w2 = cfg.w_1, cfg.w_2
        low = Level(*map(float, _int_range(w1.bit, w1.symmetric)), w1.symmetric, w1.group_size)
        high = Level(*map(float, _int_range(w2.bit, w2.symmetric)), w2.symmetric, -1)
        kind = "dgq"
    gran = "per_group" if low.group_size > 0 else "per_channel"
    return QuantArgs(bit=4, symmetric=low.symmetric, granularity=gran, group_size=low.group_size,
                     two_level=TwoLevel(kind, low, high))


def level_qparams(xmin: torch.Tensor, xmax: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
    """LLMC's Weight48IntegerQuantizer.get_qparams: (scale, zero) of each row from its [min, max]."""
    if level.symmetric:
        scale = torch.maximum(xmin.abs(), xmax.abs()).clamp(min=1e-5) / level.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin).clamp(min=1e-5) / (level.qmax - level.qmin)
        zero = level.qmin - torch.round(xmin / scale)
    zlo, zhi = level.zeros_range or (level.qmin, level.qmax)
    return scale.clamp(*level.scales_range), zero.clamp(zlo, zhi)


def level_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, level: Level) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero, level.qmin, level.qmax)


def w48_grid(weight: torch.Tensor, tl: TwoLevel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of a weight [out, in] under LLMC's bit 48, shaped like the 4-bit groups
    ([out · in / g, g] and [out · in / g, 1]), so that (codes - zero) · scale is its fake-quant weight."""
    w = weight.detach().float()
    out = w.shape[0]
    s8, z8 = level_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), tl.high)
    c8 = level_codes(w, s8, z8, tl.high)
    g = tl.low.group_size if tl.low.group_size > 0 else w.shape[1]
    c8g = c8.reshape(-1, g)
    s4, z4 = level_qparams(c8g.amin(-1, keepdim=True), c8g.amax(-1, keepdim=True), tl.low)
    q4 = level_codes(c8g, s4, z4, tl.low)
    per_group = c8g.shape[0] // out  # groups of one output channel: its 8-bit parameters repeat over them
    s8g, z8g = s8.repeat_interleave(per_group, 0), z8.repeat_interleave(per_group, 0)
    return q4, s4 * s8g, z4 + z8g / s4
