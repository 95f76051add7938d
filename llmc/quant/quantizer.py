"""Quantizer primitives: pure functions on tensors, shared by every algorithm and every exporter.

Integer grids are signed for both schemes, q ∈ [-2^(b-1), 2^(b-1)-1]: symmetric uses zero = 0 and
scale = absmax / ((qmax - qmin) / 2), the convention of GPTQ and compressed-tensors, so the negative end
of the grid is usable (`full_range`: INC's absmax / 2^(b-1) with a signed scale, the absmax exactly on
-2^(b-1)); asymmetric widens [min, max] to include 0 and picks an integer zero point.
Exporters that store unsigned codes add 2^(b-1) to codes and zero points.
Statistics are reduced over the last dimension of `grouped(x)`; every granularity is a reshape. per_block
(block_size x block_size weight tiles) views a weight as [out, in / b, b] and shares each tile's absmax over
its b rows, so the scale of row r, column group j is that of tile (r // b, j).
Two-level schemes (LLMC's `bit: 48`, DGQ) fix their codes themselves (llmc/quant/twolevel.py).
Float and 4-bit formats (`quant_type` float-quant, nvfp4, mxfp4, nf4) keep zero = 0 and take their scale
and element rounding from llmc/quant/formats.py; their "codes" are the grid values themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Optional

import torch

from llmc.quant.formats import FORMAT_MAX, format_scale, nvfp4_global_scale, round_to_grid, value_bits

if TYPE_CHECKING:
    from llmc.quant.twolevel import TwoLevel


@dataclass(frozen=True)
class QuantArgs:
    bit: int | str = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int = -1
    head_num: Optional[int] = None
    calib_algo: str = "minmax"
    static: bool = False
    ste: bool = False
    maxshrink: float = 0.8
    mse_grid: int = 100
    mse_norm: float = 2.4
    mse_b_num: int = 1
    percentile: float = 99.99
    clip_ratio: float = 1.0  # activations: minmax ranges scaled by this (QuaRot's a_clip_ratio)
    scale_dtype: Optional[str] = None
    round_zp: bool = True  # False: LLMC's float zero points (asymmetric), codes round(x/scale + zero)
    # INC's enable_full_range (symmetric integer grids): scale = absmax / 2^(b-1), negative when the absmax is a
    # positive value, so the absmax itself lands on the code -2^(b-1)
    full_range: bool = False
    quant_type: str = "int-quant"  # int-quant, float-quant, nvfp4, mxfp4, nf4 (llmc/quant/formats.py)
    block_size: Optional[int] = None  # per_block: square tiles of this size
    # bit 48 / DGQ: the two levels (llmc/quant/twolevel.py); the fields above then describe the 4-bit groups.
    two_level: Optional["TwoLevel"] = None
    # NVFP4's per-tensor scale, bound to one weight (`bind_global`); not part of the settings' identity.
    global_scale: Optional[float] = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.bit, str) and self.quant_type == "int-quant":  # QuantArgs(bit="e4m3"): FP8
            object.__setattr__(self, "quant_type", "float-quant")

    @classmethod
    def from_cfg(cls, cfg) -> Optional["QuantArgs"]:
        if cfg is None:
            return None
        if cfg.bit == 48 or cfg.w_1 is not None:
            from llmc.quant.twolevel import two_level_args

            return two_level_args(cfg)
        names = {f.name for f in fields(cls)} - {"two_level"}
        return cls(**{k: v for k, v in cfg.model_dump().items() if k in names})

    @property
    def is_float(self) -> bool:
        """Not an integer grid: the codes are the format's values (fp8, fp4, nf4 levels)."""
        return self.quant_type != "int-quant"

    @property
    def fmt(self) -> str:
        """The element format of a non-integer grid: e2m1, e4m3, e5m2 or nf4."""
        return value_bits(self.quant_type, self.bit)

    @property
    def qmin(self) -> float:
        return -self.qmax if self.is_float else -(2 ** (self.bit - 1))

    @property
    def qmax(self) -> float:
        if self.is_float:
            return 1.0 if self.fmt == "nf4" else FORMAT_MAX[self.fmt]
        return 2 ** (self.bit - 1) - 1

    def describe(self) -> str:
        named = self.quant_type in ("nvfp4", "mxfp4", "nf4")
        kind = self.quant_type if named else (f"fp{4 if self.bit == 'e2m1' else 8}-{self.bit}" if self.is_float
                                              else f"int{self.bit}")
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        gran = f"block{self.block_size}x{self.block_size}" if self.granularity == "per_block" else gran
        if self.two_level is not None:
            return self.two_level.describe(gran, self.symmetric)
        sym = ("sym full-range" if self.full_range else "sym") if self.symmetric else "asym"
        clip = f" clip {self.clip_ratio:g}" if self.clip_ratio != 1 else ""
        return f"{kind} {sym} {gran}{' static' if self.static else ''}{clip}"


def bind_global(args: Optional[QuantArgs], x: torch.Tensor) -> Optional[QuantArgs]:
    """NVFP4: `args` with the global scale of tensor x (the weight it will quantize); others unchanged."""
    if args is None or args.quant_type != "nvfp4":
        return args
    return replace(args, global_scale=float(nvfp4_global_scale(x.detach().abs().amax())))


def grouped(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View `x` as [rows, k] so that one (scale, zero) pair belongs to each row."""
    g = args.granularity
    if g == "per_tensor":
        return x.reshape(1, -1)
    if g == "per_channel":  # weights [out, in]: one row per output channel
        return x.reshape(x.shape[0], -1)
    if g == "per_group":
        if x.shape[-1] % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide the last dimension {x.shape[-1]}")
        return x.reshape(-1, args.group_size)
    if g == "per_token":
        return x.reshape(-1, x.shape[-1])
    if g == "per_head":
        return x.reshape(-1, x.shape[-1] // args.head_num)
    if g == "per_block":
        if x.dim() != 2 or x.shape[1] % args.block_size:
            raise ValueError(f"per_block needs a 2-D weight whose in_features are a multiple of block_size "
                             f"{args.block_size}; got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1, args.block_size)
    raise ValueError(f"unknown granularity {g}")


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for each row from its range; zero is an integer-valued float tensor."""
    xmin, xmax = xmin.float(), xmax.float()
    eps = torch.finfo(torch.float32).eps
    if args.is_float:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        gs = None if args.global_scale is None else torch.tensor(args.global_scale, device=absmax.device)
        scale = format_scale(absmax, args.quant_type, args.fmt, gs)
        scale = store_scale(scale, args) if args.quant_type == "float-quant" else scale
        return scale, torch.zeros_like(scale)
    if args.symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        if args.full_range:
            scale = store_scale((absmax / -args.qmin).clamp(min=eps), args)
            return torch.where(xmax.abs() > xmin.abs(), -scale, scale), torch.zeros_like(scale)
        half_range = args.qmax if args.is_float else (args.qmax - args.qmin) / 2
        scale = store_scale((absmax / half_range).clamp(min=eps), args)
        return scale, torch.zeros_like(scale)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    scale = store_scale(((xmax - xmin) / (args.qmax - args.qmin)).clamp(min=eps), args)
    if not args.round_zp:  # LLMC's round_zp: False keeps the exact (float) zero point
        return scale, args.qmin - xmin / scale
    zero = _round(args.qmin - xmin / scale, args.ste).clamp(args.qmin, args.qmax)
    return scale, zero


def store_scale(scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The scale as a checkpoint with `scale_dtype` scales will hold it (differentiable, for LWC)."""
    if args.scale_dtype in (None, "float32"):
        return scale
    if args.scale_dtype == "float16_7bit":
        # GGUF Q4_1 stores the group minimum -(zero + 8)·scale in float16 too: with 7 significant bits, any
        # 4-bit multiple of the scale is a float16, so the file holds the grid exactly
        mant, exp = torch.frexp(scale.detach().to(torch.float16).float())
        rounded = torch.ldexp(torch.round(mant * 128) / 128, exp)
        return scale + (rounded - scale).detach()
    dtype = getattr(torch, args.scale_dtype)
    return scale.to(dtype).float()


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    # Straight-through only where a gradient is wanted: x + (round(x) - x) is not always exactly round(x).
    return x + (torch.round(x) - x).detach() if ste and x.requires_grad else torch.round(x)


def quantize(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integer codes (as floats) of a grouped tensor; float formats return values on their grid."""
    if args.is_float:
        return round_to_grid(xg / scale, args.fmt)
    if not args.round_zp:  # a float zero point is added before rounding (LLMC, HQQ)
        return torch.clamp(_round(xg / scale + zero, args.ste), args.qmin, args.qmax)
    return torch.clamp(_round(xg / scale, args.ste) + zero, args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """(clamp(round(x / scale) + zero) - zero) · scale with the straight-through gradient of `quantize` +
    `dequantize`, in a handful of passes over x instead of the ~30 that autograd records for the same
    expression (OmniQuant trains through it on every weight at every step). Gradients, with t = x / scale
    and `inside` where the code was not clamped: x gets g·inside; scale gets Σ g·(round(t) - t) inside and
    Σ g·(code - zero) outside; zero gets -scale·Σ g outside."""

    @staticmethod
    def forward(ctx, xg, scale, zero, qmin: float, qmax: float):
        t = xg / scale
        code = torch.round(t)
        residual = code - t
        code.add_(zero)
        inside = (code >= qmin) & (code <= qmax)
        code.clamp_(qmin, qmax).sub_(zero)
        ctx.save_for_backward(torch.where(inside, residual, code), inside, scale)
        return code * scale

    @staticmethod
    def backward(ctx, g):
        coef, inside, scale = ctx.saved_tensors
        need_x, need_scale, need_zero = ctx.needs_input_grad[:3]
        gx = g * inside if need_x else None
        gscale = _sum_to(g * coef, scale.shape) if need_scale else None
        gzero = -scale * _sum_to(g.masked_fill(inside, 0), scale.shape) if need_zero else None
        return gx, gscale, gzero, None, None


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the dimensions its (broadcast) parameter has size 1 in."""
    dims = [d for d, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def quant_dequant(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """dequantize(quantize(xg)), through the fused straight-through function when a gradient is wanted."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xg, scale, zero))
    if args.ste and wants_grad and not args.is_float and args.round_zp:
        return _FakeQuantSTE.apply(xg, scale, zero.to(scale.dtype), float(args.qmin), float(args.qmax))
    return dequantize(quantize(xg, scale, zero, args), scale, zero)


def row_range(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)


def mse_shrinks(args: QuantArgs) -> list[float]:
    """The fractions p of each row's range the mse search tries, as GPTQ's reference (`find_params`) and
    LLMC: p = 1 - i/mse_grid for i < maxshrink·mse_grid (0.8 and 100: 80 ranges, down to 0.21 of the full)."""
    return [1 - i / args.mse_grid for i in range(max(1, int(args.maxshrink * args.mse_grid)))]


# rows are searched a chunk at a time so that one candidate's working copy stays in cache (about half the
# time of one pass over a 1536 x 576 weight); the chosen ranges do not depend on the chunking
_MSE_CHUNK_ELEMENTS = 1 << 17


def mse_range(xg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range [p·min, p·max] of the grid search over shrunken ranges (`mse_shrinks`): the first
    candidate with the smallest sum |x - Q(x)|^norm; p = 1 is the minmax candidate, so never worse. The rows
    are searched in at least `mse_b_num` chunks, as LLMC does to bound the memory of each candidate's
    quantized copy; the result does not depend on it."""
    xf = xg.float()
    chunks = max(args.mse_b_num, -(-xf.numel() // _MSE_CHUNK_ELEMENTS))
    found = [_mse_rows(rows, args) for rows in torch.tensor_split(xf, max(1, min(chunks, xf.shape[0])), dim=0)]
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def mse_qparams(xg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the mse-searched range (`mse_range`)."""
    return qparams_from_range(*mse_range(xg, args), args)


def _mse_rows(xf: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    xmin, xmax = row_range(xf)
    work = torch.empty_like(xf) if not args.is_float and args.round_zp else None
    best_lo = best_hi = best_err = None
    for p in mse_shrinks(args):
        lo, hi = p * xmin, p * xmax
        scale, zero = qparams_from_range(lo, hi, args)
        err = _err(xf, scale, zero, args, work)
        if best_err is None:
            best_lo, best_hi, best_err = lo, hi, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _err(xf, scale, zero, args, work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row, sum |x - Q(x)|^norm; given `work` (integer grid, integer zero point), computed in it in place:
    the operations of dequantize(quantize(x)) in their order, so the same values without ten temporaries."""
    if work is None:
        fq = dequantize(quantize(xf, scale, zero, args), scale, zero)
        return (fq - xf).abs().pow(args.mse_norm).sum(dim=-1, keepdim=True)
    torch.div(xf, scale, out=work).round_().add_(zero).clamp_(args.qmin, args.qmax).sub_(zero).mul_(scale)
    return work.sub_(xf).abs_().pow_(args.mse_norm).sum(dim=-1, keepdim=True)


def tile_absmax(xg: torch.Tensor, b: int) -> torch.Tensor:
    """Per row of per_block's [out, in / b, b] view, the absmax of its b x b tile; the last tile of rows may be
    partial (out not a multiple of b), as DeepSeek's FP8 layout allows (its scales are ceil(out / b) high)."""
    rows = xg.detach().abs().amax(dim=-1, keepdim=True).float()
    out, cols = rows.shape[0], rows.shape[1]
    padded = torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, (-out) % b))  # zeros never raise an absmax
    tiles = padded.view(-1, b, cols, 1).amax(dim=1, keepdim=True)
    return tiles.expand(-1, b, cols, 1).reshape(-1, cols, 1)[:out]


def calibrate(xg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of a grouped tensor with the configured range calibration (an unbound NVFP4
    global scale comes from the whole of xg)."""
    if args.quant_type == "nvfp4" and args.global_scale is None:
        args = bind_global(args, xg)
    if args.granularity == "per_block":
        absmax = tile_absmax(xg, args.block_size)
        return qparams_from_range(-absmax, absmax, args)
    if args.calib_algo == "mse":
        return mse_qparams(xg, args)
    xmin, xmax = row_range(xg)
    return qparams_from_range(xmin * args.clip_ratio, xmax * args.clip_ratio, args)


def fake_quant(x: torch.Tensor, args: QuantArgs, scale: Optional[torch.Tensor] = None,
               zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize `x` (any granularity); parameters are calibrated on `x` when not given."""
    xg = grouped(x, args)
    if scale is None:
        scale, zero = calibrate(xg, args)
    return quant_dequant(xg.float(), scale, zero, args).reshape(x.shape).to(x.dtype)
