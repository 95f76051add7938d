"""Non-integer grids: the value each element rounds to, and the per-row scale that maps a row onto the grid.

`quant_type` chooses the format (the keys of LLMC's quantizer, plus the named 4-bit formats of the peers):
  float-quant  bit e2m1 / e4m3 / e5m2: scale = absmax / format max, one per row of the granularity
               (LLMC's FloatQuantizer); e4m3/e5m2 are torch's float8_e4m3fn / float8_e5m2 grids
  nvfp4        e2m1 values, groups of 16, an FP8 e4m3 scale per group below a float32 global scale per
               tensor, exactly as compressed-tensors (llm-compressor's NVFP4 scheme) computes them
  mxfp4        e2m1 values, groups of 32, a power-of-two (E8M0) scale per group (OCP MX), its exponent
               chosen as compressed-tensors does
  nf4          QLoRA's 16 NormalFloat levels in [-1, 1], scale = absmax per group (64 by default)
Every grid is symmetric: zero is 0 and a value dequantizes as value · scale.
"""
from __future__ import annotations

import torch

FP8_TYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E2M1_MAX = 6.0
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FORMAT_MAX = {"e2m1": E2M1_MAX, **{k: torch.finfo(v).max for k, v in FP8_TYPES.items()}}
# The non-integer quant_types, and the group size the named formats fix (nf4's is only a default).
QUANT_TYPES = ("int-quant", "float-quant", "nvfp4", "mxfp4", "nf4")
GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32, "nf4": 64}
FIXED_GROUP = ("nvfp4", "mxfp4")

# QLoRA's NF4 levels (bitsandbytes' table): the quantiles of N(0, 1) normalized to [-1, 1], with an exact 0.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def value_bits(quant_type: str, bit) -> str:
    """The element format: 'e2m1', 'e4m3', 'e5m2' or 'nf4'."""
    return "nf4" if quant_type == "nf4" else ("e2m1" if quant_type in ("nvfp4", "mxfp4") else bit)


def round_e2m1(t: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), ties to the even mantissa, saturating at ±6.
    The step is 0.5 below 2 (subnormals included), 1 in [2, 4), 2 in [4, 6]; torch.round's ties-to-even on
    t / step is the mantissa's."""
    a = t.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(a.dtype)
    return torch.copysign(torch.round(a / step) * step, t)


def round_nf4(t: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level of t in [-1, 1] (a tie goes to the upper level)."""
    levels = torch.tensor(NF4_LEVELS, dtype=t.dtype, device=t.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(t.clamp(-1, 1).contiguous(), mids, right=True)]


def round_to_grid(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """t (already divided by its scale) on the element grid, saturating at the format's largest value."""
    if fmt == "e2m1":
        return round_e2m1(t)
    if fmt == "nf4":
        return round_nf4(t)
    bound = FORMAT_MAX[fmt]
    return t.clamp(-bound, bound).to(FP8_TYPES[fmt]).to(t.dtype)


def nvfp4_global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `generate_gparam`: 448 · 6 / amax of the whole tensor (float32; 1 when not finite)."""
    amax = absmax.float().max().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(FP8_E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_scale(absmax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The effective per-group scale fp8(global · absmax / 6) / global (compressed-tensors' calculate_qparams
    with FP8 scale_dtype: clamped to ±448 and cast, a 0 replaced by 0.125, divided by the global scale when
    quantizing and dequantizing)."""
    stored = (global_scale * (absmax.float() / E2M1_MAX)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    stored = stored.to(torch.float8_e4m3fn).float()
    stored = torch.where(stored == 0, torch.full_like(stored, 0.125), stored)
    return stored / global_scale


def mxfp4_scale(absmax: torch.Tensor) -> torch.Tensor:
    """2^(e - 2), e = the exponent of absmax rounded to a power of two upward when its mantissa is at least
    1.75 (compressed-tensors' `generate_mx_scales`: the group's max lands in [3.5, 7) · scale, values above 6
    saturating), the E8M0 exponent clamped to [-127, 128]. OCP's reference takes floor(log2 absmax) - 2."""
    bits = absmax.float().contiguous().view(torch.int32)
    rounded = ((bits + (1 << 21)) & (0x1FF << 23)).view(torch.float32)  # keep sign and exponent
    exponent = (torch.floor(torch.log2(rounded)) - 2).clamp(-127, 128)
    return torch.exp2(exponent)


def format_scale(absmax: torch.Tensor, quant_type: str, fmt: str, global_scale=None) -> torch.Tensor:
    """The per-row scale of a non-integer grid from each row's absmax."""
    if quant_type == "nvfp4":
        return nvfp4_scale(absmax, global_scale if global_scale is not None else nvfp4_global_scale(absmax))
    if quant_type == "mxfp4":
        return mxfp4_scale(absmax)
    top = 1.0 if fmt == "nf4" else FORMAT_MAX[fmt]
    return (absmax.float() / top).clamp(min=torch.finfo(torch.float32).eps)
