"""SpQR (Dettmers et al., 2023, Sparse-Quantized Representation): GPTQ over small groups (LLMC: 16
columns) whose statistics are quantized themselves, with the weights GPTQ cannot fit kept in float.

Per linear, on GPTQ's solve (llmc/algorithms/gptq.py, through its SolverHook), with d = diag of the upper
Cholesky factor of H⁻¹ (the permuted one under act order):
- threshold τ = relative_threshold · mean_j(Var_i W_ij / d_j²) (LLMC);
- at each group start (unless `simplified_outliers`), the weights whose leave-one-out drop of the group's
  error, Σ_k ((RTN(G)-G)/d)² minus the same over the group without that weight (per row, a per-row
  min-max grid of the weight's bits), exceeds τ are set aside: the group's grid is fitted on the row
  with them replaced by the mean of the others;
- the group's scales and zeros (one per row) are quantized by the `scale` / `zero` quantizers, whose own
  groups run over `group_size` consecutive rows (min-max ranges of the statistics, not widened to 0, as
  LLMC and the paper);
- each column is rounded on that grid; weights whose error ((w - q)/d)² exceeds τ stay float (their
  error, then zero, is not propagated).
Fake-quant only: the outliers are a sparse float matrix no packed format stores.

Bits per weight (logged per linear and for the run): w bits per weight, the first-level statistics at the
`scale`/`zero` quantizers' bits (16 when not quantized), 16-bit scale and zero of each second-level
group, 32 bits per outlier (a 16-bit value and a 16-bit column index, the paper's count), and under act
order a 32-bit group index per input column (as llmc/quant/bits.py counts GPTQ's).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from loguru import logger
from pydantic import Field

from llmc.algorithms.base import Options
from llmc.algorithms.gptq import GPTQ, GPTQOptions, SolverHook
from llmc.config.quant_spec import QuantSpecCfg
from llmc.errors import ConfigError
from llmc.quant.quantizer import QuantArgs, calibrate, dequantize, quantize, row_range
from llmc.registry import ALGORITHMS

PACKED = ("save_autoawq", "save_gptq", "save_vllm", "save_sgl")
OUTLIER_BITS = 32  # a float16 value and a 16-bit column index


class SpQROptions(Options):
    actorder: bool = False
    percdamp: float = Field(0.01, gt=0, le=1)
    blocksize: int = Field(128, ge=1)
    true_sequential: bool = True
    relative_threshold: Union[float, Literal["inf"]] = 0.2  # "inf" (LLMC's spelling) or .inf: no outliers
    simplified_outliers: bool = False
    scale: Optional[QuantSpecCfg] = None  # quantizer of the group scales (None: kept float16)
    zero: Optional[QuantSpecCfg] = None   # quantizer of the group zero points (None: kept as the weight's)

    def threshold(self) -> float:
        return math.inf if self.relative_threshold == "inf" else float(self.relative_threshold)


def stat_qparams(vg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of grouped values from their own min-max range (not widened to include 0, as
    LLMC's and SpQR's statistic quantizers: a group of positive scales would lose a level to 0 otherwise)."""
    if args.symmetric:
        absmax = vg.abs().amax(dim=-1, keepdim=True)
        scale = (absmax / ((args.qmax - args.qmin) / 2)).clamp(min=1e-9)
        return scale, torch.zeros_like(scale)
    lo, hi = row_range(vg)
    scale = ((hi - lo) / (args.qmax - args.qmin)).clamp(min=1e-9)
    zero = args.qmin - lo / scale
    if args.round_zp:
        zero = torch.round(zero).clamp(args.qmin, args.qmax)
    return scale, zero


def stat_fake_quant(v: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """A column of statistics [rows, 1] through its quantizer: groups of `group_size` consecutive rows (one
    group per_tensor; per_channel leaves each value alone, i.e. unchanged)."""
    if args.granularity == "per_channel":
        return v
    vg = v.reshape(1, -1) if args.granularity == "per_tensor" else v.reshape(-1, args.group_size)
    scale, zero = stat_qparams(vg, args)
    return dequantize(quantize(vg, scale, zero, args), scale, zero).reshape(v.shape)


def stat_groups(rows: int, args: Optional[QuantArgs]) -> int:
    """Second-level groups over `rows` statistics (0: the statistic is not quantized)."""
    if args is None or args.granularity == "per_channel":
        return 0
    return 1 if args.granularity == "per_tensor" else rows // args.group_size


def loo_gain(G: torch.Tensor, d: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """[rows, k]: how much the group's scaled error Σ((RTN(G)-G)/d)² falls when weight j is left out of the
    row (each row its own min-max grid of the weight's bits, float zero point)."""
    per_row = QuantArgs(bit=args.bit, symmetric=args.symmetric, round_zp=False)
    k = G.shape[1]
    idx = torch.arange(k, device=G.device)
    others = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)  # row j: every column but j
    loo = G[:, others]                                          # [rows, k, k-1]
    flat = loo.reshape(-1, k - 1)
    s, z = stat_qparams(flat, per_row)
    loo_err = ((dequantize(quantize(flat, s, z, per_row), s, z).reshape(loo.shape) - loo) / d[others]).square().sum(-1)
    s, z = stat_qparams(G, per_row)
    base = ((dequantize(quantize(G, s, z, per_row), s, z) - G) / d).square().sum(dim=1, keepdim=True)
    return base - loo_err


class SpQRHook(SolverHook):
    """One linear's SpQR solve: outlier-aware group grids with quantized statistics, float outliers."""

    def __init__(self, opts: SpQROptions, wargs: QuantArgs, sargs: Optional[QuantArgs], zargs: Optional[QuantArgs]):
        self.opts, self.wargs, self.sargs, self.zargs = opts, wargs, sargs, zargs
        self.groups = 0

    def start(self, W, Hinv, perm):
        d = torch.diag(Hinv)
        self.perm = perm
        self.mask = torch.zeros_like(W, dtype=torch.bool)
        rel = self.opts.threshold()
        self.tau = math.inf if rel == math.inf else rel * float((W.var(dim=0) / d.square()).mean())

    def group(self, G, col, hinv_diag, args):
        self.groups += 1
        if not (self.opts.simplified_outliers or self.tau == math.inf):
            out = (loo_gain(G, hinv_diag, args) > self.tau).float()
            mean = (G * (1 - out)).sum(dim=1, keepdim=True) / (1 - out).sum(dim=1, keepdim=True).clamp_min(1)
            G = G * (1 - out) + mean * out
        scale, zero = calibrate(G, args)
        if self.sargs is not None:
            # a dequantized scale of 0 would divide by zero where a float one cannot be
            scale = stat_fake_quant(scale, self.sargs).clamp(min=torch.finfo(torch.float32).eps)
        if self.zargs is not None:
            zero = stat_fake_quant(zero, self.zargs)
        return scale, zero

    def column(self, col, w, q, d):
        if self.tau == math.inf:
            return q
        out = ((w - q) / d).square() > self.tau
        self.mask[:, col] = out
        return torch.where(out, w, q)

    def result(self, where: str) -> tuple[Optional[torch.Tensor], int]:
        """(the bool [out, in] outlier mask in the original column order or None, the linear's storage bits)."""
        mask, wargs = self.mask, self.wargs
        if self.perm is not None:
            mask = mask[:, torch.argsort(self.perm)]
        rows, cols = mask.shape
        n_out = int(mask.sum())
        first = self.groups * rows
        stat_bits = lambda a, other: a.bit if a is not None else other  # noqa: E731
        zero_bits = 0 if wargs.symmetric else stat_bits(self.zargs, wargs.bit if wargs.round_zp else 16)
        bits = (rows * cols * wargs.bit + first * (stat_bits(self.sargs, 16) + zero_bits)
                + self.groups * 32 * (stat_groups(rows, self.sargs) + stat_groups(rows, self.zargs))
                + n_out * OUTLIER_BITS + (32 * cols if self.perm is not None else 0))
        logger.info(f"SpQR {where}: {n_out} outliers ({100 * n_out / mask.numel():.2f}%), "
                    f"{bits / mask.numel():.3f} bits per weight")
        return (mask if n_out else None), bits


@ALGORITHMS.register("SpQR")
class SpQR(GPTQ):
    name = "SpQR"
    Options = SpQROptions

    @classmethod
    def check(cls, config) -> None:
        opts = SpQROptions.model_validate(config.quant.special)
        w = config.quant.weight
        if w is None or w.granularity != "per_group" or isinstance(w.bit, str) or w.quant_type != "int-quant":
            raise ConfigError("quant.weight", f"{None if w is None else w.granularity} / bit "
                              f"{None if w is None else w.bit}: SpQR quantizes integer weights per_group (small "
                              "groups, e.g. granularity: per_group, group_size: 16)")
        if w.symmetric:
            raise ConfigError("quant.weight.symmetric", "True: SpQR's groups are asymmetric min-max grids whose zero "
                              "points it quantizes; set symmetric: False")
        if opts.threshold() <= 0:
            raise ConfigError("quant.special.relative_threshold", f"{opts.relative_threshold}: expected a number > 0 "
                              "or inf (no outliers)")
        if opts.zero is not None and w.round_zp:
            raise ConfigError("quant.weight.round_zp", "True with quant.special.zero: the quantized zero points are "
                              "not integers; set quant.weight.round_zp: False (LLMC's SpQR config)")
        for key, spec in (("scale", opts.scale), ("zero", opts.zero)):
            if spec is not None and (spec.quant_type != "int-quant" or spec.granularity not in ("per_group", "per_tensor")):
                raise ConfigError(f"quant.special.{key}.granularity", f"{spec.granularity} ({spec.quant_type}): a "
                                  "statistic quantizer is an integer grid per_group (over consecutive output "
                                  "channels) or per_tensor")
        for key in PACKED:
            if getattr(config.save, key, False):
                raise ConfigError(f"save.{key}", "True with SpQR: its outliers stay float and its statistics are "
                                  "quantized, which no packed format stores; use save_fake")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        opts = SpQROptions.model_validate(config.quant.special)
        for key, spec in (("scale", opts.scale), ("zero", opts.zero)):
            if spec is None or spec.granularity != "per_group":
                continue
            for i, block in enumerate(adapter.block_list()):
                for name in adapter.linear_names():
                    rows = block.get_submodule(name).out_features
                    if rows % spec.group_size:
                        raise ConfigError(f"quant.special.{key}.group_size", f"{spec.group_size} does not divide "
                                          f"out_features {rows} of {adapter.block_name(i)}.{name}; the statistics' "
                                          "groups run over output channels")

    def __init__(self, wargs, aargs, options: SpQROptions):
        super(GPTQ, self).__init__(wargs, aargs, options)
        self.sargs, self.zargs = QuantArgs.from_cfg(options.scale), QuantArgs.from_cfg(options.zero)
        logger.info(f"SpQR: relative_threshold {options.relative_threshold}, simplified_outliers "
                    f"{options.simplified_outliers}, scales {self.sargs.describe() if self.sargs else 'float16'}, "
                    f"zeros {self.zargs.describe() if self.zargs else 'unquantized'}")

    def solver_options(self) -> GPTQOptions:
        o = self.options
        return GPTQOptions(actorder=o.actorder, percdamp=o.percdamp, blocksize=o.blocksize,
                           true_sequential=o.true_sequential)

    def solver_hook(self, q):
        return SpQRHook(self.options, q.wargs, self.sargs, self.zargs)

    def weak_columns(self, job, name, W, H):
        return None
