"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales
s = max|X|^alpha / max|W|^(1-alpha), folded into the op in front of each subset so the float model is
unchanged. Options beyond the paper: a per-subset alpha search minimising the quantized output error
of the subset's `inspect` module (as SmoothQuant's autotune and PaddleSlim do), and an OS+-style channel
shift z = (max + min) / 2 folded into biases, which centres each channel before scaling.

As LLMC, only subsets behind a norm are smoothed by default; `smooth_all` also smooths those behind a
linear (v_proj → o_proj, up_proj → down_proj), where W4A4-style settings find their worst outliers.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import Fold, channel_ranges, fold_plan, forward_loss
from llmc.errors import ConfigError
from llmc.quant.fake_linear import ActQuantizer
from llmc.quant.quantizer import fake_quant
from llmc.registry import ALGORITHMS


class SmoothQuantOptions(Options):
    alpha: float = 0.5
    alpha_search: bool = False
    alpha_min: float = 0.05
    alpha_max: float = 0.95
    alpha_step: float = 0.05
    use_shift: bool = False
    smooth_all: bool = False
    save_scale: bool = False
    scale_path: Optional[str] = None

    def alphas(self) -> list[float]:
        if not self.alpha_search:
            return [self.alpha]
        n = int(round((self.alpha_max - self.alpha_min) / self.alpha_step))
        return [round(self.alpha_min + i * self.alpha_step, 6) for i in range(n + 1)]

    def outputs(self) -> dict[str, Optional[str]]:
        if not self.save_scale:
            return {}
        out = {"scales": self.scale_path}
        if self.use_shift and self.scale_path:
            path = Path(self.scale_path)
            out["shifts"] = str(path.with_name(path.stem + "_shifts.safetensors")) if path.suffix else self.scale_path
        return out


@ALGORITHMS.register("SmoothQuant")
class SmoothQuant(Algorithm):
    name = "SmoothQuant"
    keeps_float = True  # float weights change only by folds
    folds = True
    Options = SmoothQuantOptions
    data_driven = True
    batch_invariant = True

    @classmethod
    def produces(cls, options: SmoothQuantOptions) -> set[str]:
        return {"scales", "shifts"} if options.use_shift else {"scales"}

    @classmethod
    def check(cls, config) -> None:
        opts = SmoothQuantOptions.model_validate(config.quant.special)
        if not 0 <= opts.alpha <= 1:
            raise ConfigError("quant.special.alpha", f"{opts.alpha}: expected a value in [0, 1]")
        if opts.alpha_search and "alpha" in opts.model_fields_set:
            # the search never reads alpha: refusing beats running with a value the user did not get
            raise ConfigError("quant.special.alpha", f"{opts.alpha} is not used with alpha_search: True; the "
                              "search picks one alpha per subset from the grid alpha_min..alpha_max by "
                              "alpha_step: remove alpha (or set alpha_search: False to use it)")
        grid = sorted({"alpha_min", "alpha_max", "alpha_step"} & opts.model_fields_set)
        if grid and not opts.alpha_search:
            raise ConfigError(f"quant.special.{grid[0]}", f"{getattr(opts, grid[0])} defines alpha_search's grid, "
                              f"which is off: set alpha_search: True, or remove {', '.join(grid)} (alpha "
                              f"{opts.alpha} is used)")
        if opts.alpha_search and not opts.alpha_step > 0:
            raise ConfigError("quant.special.alpha_step", f"{opts.alpha_step}: expected a step > 0")
        if opts.alpha_search and not 0 <= opts.alpha_min <= opts.alpha_max <= 1:
            raise ConfigError("quant.special.alpha_min", f"[{opts.alpha_min}, {opts.alpha_max}]: expected "
                              "0 <= alpha_min <= alpha_max <= 1")
        if opts.save_scale and not opts.scale_path:
            raise ConfigError("quant.special.scale_path", "save_scale: True needs a path")
        if config.quant.act is None:
            raise ConfigError("quant.act", "SmoothQuant balances activation and weight ranges: an act section "
                              "is required (for weight-only quantization use AWQ)")

    def apply(self, job, targets):
        opts: SmoothQuantOptions = self.options
        plans = []
        for subset in job.subsets:
            layers = job.quantized_layers(subset)
            prev = job.module(subset.prev_op) if subset.prev_op else None
            if not layers or (isinstance(prev, nn.Linear) and not opts.smooth_all):
                continue
            fold = fold_plan(job, subset, shift=opts.use_shift)
            if fold is not None:
                plans.append((subset, layers, fold))
        inputs = sorted({subset.input for subset, _, _ in plans})
        feats = job.capture(inputs) if opts.alpha_search else None
        lo, hi = channel_ranges(job, inputs, feats)
        scales, shifts = {}, {}
        for subset, layers, fold in plans:
            shift = None
            x_lo, x_hi = fold.reduce(lo[subset.input], "min"), fold.reduce(hi[subset.input], "max")
            if opts.use_shift and fold.can_shift:
                shift = (x_hi + x_lo) / 2
                x_absmax = (x_hi - x_lo) / 2
            else:
                x_absmax = torch.maximum(x_hi.abs(), x_lo.abs())
            w_absmax = fold.reduce(torch.stack([job.module(n).weight.detach().abs().amax(0).float()
                                                for n in subset.layers]).amax(0), "max")
            alphas = opts.alphas()
            alpha = alphas[0] if len(alphas) == 1 else self._search_alpha(
                job, subset, layers, fold, feats[subset.input], x_absmax, w_absmax, shift, alphas,
                (lo[subset.input], hi[subset.input]))
            s = smoothing_scales(x_absmax, w_absmax, alpha)
            full = fold.apply(s, shift)
            for name in subset.layers:
                scales[job.full_name(name)] = full.cpu()
                if shift is not None:
                    shifts[job.full_name(name)] = fold.expand(shift).cpu()
            logger.debug(f"SmoothQuant {job.full_name(subset.layers[0])}: alpha {alpha:.2f}"
                         f"{', shifted' if shift is not None else ''}")
        qlinears = self.install_all(job)
        for q in qlinears.values():
            q.set_weight_qparams()
        self.calibrate_static_acts(job, qlinears)
        return {k: v for k, v in (("scales", scales), ("shifts", shifts)) if v}

    def _search_alpha(self, job, subset, layers, fold: Fold, xs, x_absmax, w_absmax, shift, alphas,
                      x_range: tuple[torch.Tensor, torch.Tensor]) -> float:
        """The alpha whose smoothed, quantized subset gives the least inspect-output error. Each linear
        computes Q_a((x - z)/s)·s + z against Q_w(W s)/s, which equals the smoothed quantized linear
        (up to the bias term z·(W - Q_w(W s)/s) a shift leaves), without re-folding per candidate.

        A static per-tensor activation range is known exactly for each candidate from the channel ranges
        of all the calibration data (min and max of (x - z)/s over channels), so the search quantizes
        with the range the calibrated model will have; other static granularities are searched with
        their dynamic counterpart."""
        linears = [job.module(n) for n in layers]
        originals = [lin.weight.data.clone() for lin in linears]
        exact = self.aargs.static and self.aargs.granularity == "per_tensor" and self.aargs.calib_algo == "minmax"
        act = ActQuantizer(self.aargs if exact else replace(self.aargs, static=False))
        loss_of = forward_loss(job, subset, xs)
        losses = []
        try:
            for alpha in alphas:
                full = fold.expand(smoothing_scales(x_absmax, w_absmax, alpha))
                z = fold.expand(shift) if shift is not None else None
                if exact:
                    lo, hi = ((r - (z if z is not None else 0)) / full for r in x_range)
                    act.set_static(lo.amin().reshape(1, 1), hi.amax().reshape(1, 1))
                for lin, w in zip(linears, originals):
                    scaled = w * full.view(1, -1).to(w.dtype)
                    lin.weight.data.copy_((fake_quant(scaled, self.wargs) if self.wargs else scaled) / full.view(1, -1))
                with _input_hooks(linears, lambda x: _smoothed_act_quant(act, x, full, z)):
                    losses.append(loss_of())
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data.copy_(w)
        return alphas[min(range(len(alphas)), key=losses.__getitem__)]


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    x_absmax = x_absmax.clamp(min=1e-5)
    return (x_absmax.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def _smoothed_act_quant(act: ActQuantizer, x: torch.Tensor, full: torch.Tensor,
                        shift: Optional[torch.Tensor]) -> torch.Tensor:
    s = full.to(x.dtype)
    if shift is None:
        return act(x / s) * s
    z = shift.to(x.dtype)
    return act((x - z) / s) * s + z


@contextmanager
def _input_hooks(modules: list[nn.Module], fn) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(lambda m, inp: (fn(inp[0]), *inp[1:])) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
