"""Fake-quant modules: a linear that quantizes its weight (and optionally its input) on the grid the
algorithm chose, and the activation quantizer it uses."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmc.quant.hadamard import attach, rotation_of
from llmc.quant.quantizer import (QuantArgs, bind_global, calibrate, dequantize, fake_quant, grouped, qparams_from_range,
                                  quant_dequant, quantize, row_range)


class ActQuantizer(nn.Module):
    """Dynamic (per token/tensor/head, parameters from each input) or static (parameters calibrated once)."""

    def __init__(self, args: QuantArgs):
        super().__init__()
        self.args = args
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.observing = False
        self._stats: dict[str, tuple[torch.Tensor, str]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        xg = grouped(x, self.args)
        if self.args.static:
            if self.scale is None:
                raise RuntimeError("static activation quantizer used before calibration")
            scale, zero = self.scale, self.zero
        else:
            scale, zero = calibrate(xg.detach(), self.args)
        return quant_dequant(xg.float(), scale, zero, self.args).reshape(x.shape).to(x.dtype)

    def _observe(self, x: torch.Tensor) -> None:
        if self.args.calib_algo == "static_hist":  # LLMC's histogram search, one running histogram per input
            from llmc.quant.histogram import HistogramRange

            if not self._stats:
                self._stats = {"hist": (HistogramRange(self.args.bit), "")}
            self._stats["hist"][0].update(x)
            return
        xg = grouped(x.detach().float(), self.args)
        if self.args.calib_algo == "percentile":
            # Per batch, the values at the (100-p)th and pth percentiles; averaged over batches, so a few
            # extreme tokens do not set the range (TensorRT's percentile calibration, per batch).
            lo, hi = _percentiles(xg, self.args.percentile)
            stats = {"lo_sum": (lo, "sum"), "hi_sum": (hi, "sum"), "batches": (torch.ones_like(lo), "sum")}
            self._stats = {k: (v if k not in self._stats else self._stats[k][0] + v, op) for k, (v, op) in stats.items()}
            return
        xmin, xmax = row_range(xg)
        xmin, xmax = xmin.amin(dim=0, keepdim=True), xmax.amax(dim=0, keepdim=True)
        if self._stats:
            xmin, xmax = torch.minimum(self._stats["min"][0], xmin), torch.maximum(self._stats["max"][0], xmax)
        self._stats = {"min": (xmin, "min"), "max": (xmax, "max")}

    def observed_stats(self) -> dict[str, tuple[torch.Tensor, str]]:
        """What observation accumulated, each with the op that combines it across processes."""
        if not self._stats:
            raise RuntimeError("static activation quantizer saw no calibration input")
        if "hist" in self._stats:  # per process, as LLMC: the searched absmax, averaged over processes
            lo, hi = self._stats["hist"][0].threshold()
            absmax = torch.maximum(lo.abs(), hi.abs()).reshape(1, 1)
            return {"absmax_sum": (absmax, "sum"), "batches": (torch.ones_like(absmax), "sum")}
        return self._stats

    def finish_observation(self, stats: dict[str, torch.Tensor]) -> None:
        """Fix static parameters from (reduced) observed statistics."""
        if "absmax_sum" in stats:
            xmax = stats["absmax_sum"] / stats["batches"]
            xmin = -xmax
        elif "min" in stats:
            xmin, xmax = stats["min"] * self.args.clip_ratio, stats["max"] * self.args.clip_ratio
        else:
            xmin, xmax = stats["lo_sum"] / stats["batches"], stats["hi_sum"] / stats["batches"]
        self.set_static(xmin, xmax)

    def set_static(self, xmin: torch.Tensor, xmax: torch.Tensor) -> None:
        self.scale, self.zero = qparams_from_range(xmin, xmax, self.args)
        self._stats = {}

    def extra_repr(self) -> str:
        return self.args.describe()


def _percentiles(xg: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a grouped tensor, the values at percentiles 100-p and p (kthvalue: no size limit)."""
    n = xg.shape[-1]
    k_hi = max(1, min(n, int(round(n * p / 100))))
    k_lo = max(1, n - k_hi + 1)
    return xg.kthvalue(k_lo, dim=-1, keepdim=True).values, xg.kthvalue(k_hi, dim=-1, keepdim=True).values


class QuantLinear(nn.Module):
    """Holds the float (possibly transformed) weight and its quantization grid.

    With quantization enabled the forward uses the fake-quantized weight (cached until the weight or
    the grid changes); disabled, it is the plain linear. Parameter names match nn.Linear, and the
    grid buffers are not persistent, so `state_dict` keys are those of the original model.
    """

    def __init__(self, linear: nn.Linear, wargs: Optional[QuantArgs], aargs: Optional[QuantArgs] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.wargs = bind_global(wargs, linear.weight)  # NVFP4: the global scale of the weight as installed
        self.act_quant = ActQuantizer(aargs) if aargs is not None else None
        self.register_buffer("w_scale", None, persistent=False)
        self.register_buffer("w_zero", None, persistent=False)
        self.register_buffer("w_gidx", None, persistent=False)  # group of each input column (GPTQ act order)
        # input columns kept float (OWQ, QUIK), or a bool [out, in] mask of weights kept float (SpQR's outliers)
        self.register_buffer("w_float_cols", None, persistent=False)
        self.register_buffer("a_float_cols", None, persistent=False)  # input features the act quantizer skips (QUIK)
        self.register_buffer("w_codes", None, persistent=False)  # codes fixed by a two-level scheme (twolevel.py)
        # LLM.int8(): input features with any |x| >= this are computed in float (weight columns too), per forward
        self.outlier_threshold: Optional[float] = None
        # bits this linear takes stored, when its algorithm stores more than its grid says (SpQR's quantized
        # statistics and outliers; llmc/quant/bits.py); reset whenever the grid is set
        self.storage_bits: Optional[int] = None
        self.w_axis = 1  # 0: the grid groups weight.T's rows, i.e. runs along output channels (HQQ axis 0)
        self.lwc: Optional[nn.Module] = None  # OmniQuant's learnable clipping while it trains
        self.quant_enabled = True
        self._cache_key = None
        self._act_rest = None  # (float_cols, key, quantized column indices) for _quant_act
        self._cache: Optional[torch.Tensor] = None
        if rotation_of(linear) is not None:  # QuaRot's online Hadamard: runs before the activation quantizer
            attach(self, rotation_of(linear))

    def set_weight_qparams(self, scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                           g_idx: Optional[torch.Tensor] = None, float_cols: Optional[torch.Tensor] = None,
                           axis: int = 1, codes: Optional[torch.Tensor] = None) -> None:
        """Fix the grid; calibrated from the current weight with the configured algorithm when not given.
        scale/zero are one per row of grouped(weight) (of grouped(weight.T) with axis 0); with g_idx,
        [out, groups] and column j uses group g_idx[j]. The input columns in float_cols stay float. `codes`
        (shaped like grouped(weight)) fixes the codes too: two-level schemes round twice, so their codes are
        not round(w / scale) + zero."""
        if self.wargs is None:
            return
        self.w_axis = axis
        two_level = self.wargs.two_level
        if scale is None and two_level is not None:
            if two_level.kind != "w48":
                raise RuntimeError(f"{two_level.kind} weights are set by their algorithm, not calibrated")
            from llmc.quant.twolevel import w48_grid

            codes, scale, zero = w48_grid(self.weight, two_level)
        if scale is None:
            self.wargs = bind_global(self.wargs, self.weight)
            scale, zero = calibrate(grouped(self._oriented(self.weight.detach()), self.wargs), self.wargs)
        self.w_scale, self.w_zero = scale.detach(), zero.detach()
        self.w_gidx = g_idx
        self.w_float_cols = float_cols
        self.w_codes = None if codes is None else codes.detach()
        self.storage_bits = None
        self._cache = None

    def set_act_float_cols(self, cols: Optional[torch.Tensor]) -> None:
        """Keep these input features float in activation quantization (the others share its ranges)."""
        self.a_float_cols = None if cols is None or len(cols) == 0 else cols.detach().long()

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.w_axis == 0 else w

    def freeze_lwc(self) -> None:
        """Fix the grid the learned clipping factors give on the current weight, and drop them."""
        with torch.no_grad():
            scale, zero = self.lwc.qparams(self.weight)
        self.lwc = None
        self.set_weight_qparams(scale, zero)

    def int_weight(self) -> torch.Tensor:
        """Integer codes of the weight, shaped like grouped(weight) (like the weight when g_idx is set)."""
        if self.w_codes is not None:
            return self.w_codes
        w = self.weight.detach().float()
        if self.w_gidx is not None:
            out = self.out_features
            scale = self.w_scale.view(out, -1)[:, self.w_gidx]
            zero = self.w_zero.view(out, -1)[:, self.w_gidx]
            return quantize(w, scale, zero, self.wargs)
        return quantize(grouped(self._oriented(w), self.wargs), self.w_scale, self.w_zero, self.wargs)

    def dequantized(self) -> torch.Tensor:
        q = self.int_weight()
        if self.w_gidx is not None:
            out = self.out_features
            w = dequantize(q, self.w_scale.view(out, -1)[:, self.w_gidx], self.w_zero.view(out, -1)[:, self.w_gidx])
        elif self.w_axis == 0:
            w = dequantize(q, self.w_scale, self.w_zero).reshape(self.weight.T.shape).T
        else:
            w = dequantize(q, self.w_scale, self.w_zero).reshape(self.weight.shape)
        if self.w_float_cols is not None and self.w_float_cols.dim() == 2:
            w = torch.where(self.w_float_cols, self.weight.detach().to(w.dtype), w)
        elif self.w_float_cols is not None:
            w[:, self.w_float_cols] = self.weight.detach()[:, self.w_float_cols].to(w.dtype)
        return w

    def fake_weight(self) -> torch.Tensor:
        if self.wargs is None:
            return self.weight
        if self.lwc is not None:
            return self.lwc.fake_quant(self.weight)
        if self.w_scale is None:
            self.set_weight_qparams()
        key = (self.weight.data_ptr(), self.weight._version, self.w_scale.data_ptr())
        if self._cache is None or self._cache_key != key or self.weight.requires_grad:
            fake = self.dequantized().to(self.weight.dtype)
            # A weight already on its grid (GPTQ leaves it so) is its own fake-quant weight: sharing it
            # saves a copy of every finished linear while the block is worked on.
            on_grid = not self.weight.requires_grad and torch.equal(fake, self.weight)
            self._cache = self.weight.detach() if on_grid else fake
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        if self.outlier_threshold is not None:
            return self._decomposed(x)
        if self.act_quant is not None:
            x = self._quant_act(x, self.a_float_cols)
        return F.linear(x, self.fake_weight(), self.bias)

    def _quant_act(self, x: torch.Tensor, float_cols: Optional[torch.Tensor]) -> torch.Tensor:
        if float_cols is None:
            return self.act_quant(x)
        rest = self._quantized_cols(float_cols, x.shape[-1], x.device)
        # ranges from the quantized features only; index_select/index_copy_ with an index built once per set
        # of float columns, where a boolean mask would cost a host sync on every forward on CUDA
        return x.clone().index_copy_(-1, rest, self.act_quant(x.index_select(-1, rest)))

    def _quantized_cols(self, float_cols: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
        """Indices of the input features outside float_cols, cached while float_cols is the same, unchanged
        tensor (held by the cache, so its identity cannot pass to a new tensor)."""
        cached = self._act_rest
        key = (float_cols._version, width, device)
        if cached is None or cached[0] is not float_cols or cached[1] != key:
            keep = torch.ones(width, dtype=torch.bool)
            keep[float_cols.cpu()] = False
            cached = self._act_rest = (float_cols, key, torch.nonzero(keep).flatten().to(device))
        return cached[2]

    def _decomposed(self, x: torch.Tensor) -> torch.Tensor:
        """LLM.int8()'s mixed-precision decomposition, fake-quantized: the input features holding any value
        of magnitude >= outlier_threshold in this call, and their weight columns, stay float; the rest is
        quantized (activations by the act quantizer, weights on a grid from the remaining columns only)."""
        outlier = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0) >= self.outlier_threshold
        cols = torch.nonzero(outlier).flatten()
        key = (self.weight.data_ptr(), self.weight._version, tuple(cols.tolist()))
        if self._cache is None or self._cache_key != key:
            w = self.weight.detach().clone()
            rest = ~outlier
            if self.wargs is not None and rest.any():
                w[:, rest] = fake_quant(w[:, rest].float(), self.wargs).to(w.dtype)
            self._cache, self._cache_key = w, key
        if self.act_quant is not None:
            x = self._quant_act(x, cols if len(cols) else None) if len(cols) < x.shape[-1] else x
        return F.linear(x, self._cache, self.bias)

    def drop_cache(self) -> None:
        """Forget the cached fake-quantized weight (the block's tensors are leaving memory)."""
        self._cache, self._cache_key = None, None

    def to_linear(self, fake: bool) -> nn.Linear:
        """A plain nn.Linear with the float or the fake-quantized weight (for saving)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        # LLM.int8()'s weight grid depends on each input: saved float, its settings recorded beside it
        fake = fake and self.outlier_threshold is None
        linear.weight = nn.Parameter(self.fake_weight().detach().clone() if fake else self.weight.detach(),
                                     requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        if rotation_of(self) is not None:
            attach(linear, rotation_of(self))
        return linear

    def extra_repr(self) -> str:
        w = self.wargs.describe() if self.wargs else "float"
        return f"in={self.in_features}, out={self.out_features}, weight={w}"


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def unwrap_quant_linears(model: nn.Module) -> None:
    """Replace every QuantLinear by a plain nn.Linear holding its float (transformed) weight."""
    from llmc.models.adapter import set_module

    for name, q in list(quant_linears(model)):
        set_module(model, name, q.to_linear(fake=False))


@contextmanager
def quant_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its transformed float self (eval position `transformed`)."""
    modules = [m for _, m in quant_linears(model)]
    before = [m.quant_enabled for m in modules]
    for m in modules:
        m.quant_enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, before):
            m.quant_enabled = state
