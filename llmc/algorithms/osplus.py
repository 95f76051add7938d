"""Outlier Suppression+ (Wei et al., 2023): per input channel of each subset, a shift z = (max + min) / 2
that centres the channel and a scale s = max(1, max|x - z| / t) that squeezes the channels whose centred
range passes a threshold t; t is searched, as in LLMC, on a grid from the largest centred value down to 1
(max(100, amax / 0.5) steps) for the least error of the subset's `inspect` output with quantized weights
and activations. Both fold into the op in front of the subset (its weight and bias divided by s, the bias
less z) and into the subset's linears (columns times s, W z added to the bias), so the float block is
unchanged.

The shift needs a bias on the op in front and on every linear it feeds (OPT-style LayerNorm models). As
LLMC, models without one (Llama's RMSNorm, bias-free linears) take the scale only, logged per subset.
LLMC transforms only the subsets behind a norm; `smooth_all` adds those behind a linear (v → o, up → down).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import Fold, channel_ranges, fold_plan, forward_loss
from llmc.algorithms.smoothquant import _input_hooks, _smoothed_act_quant
from llmc.errors import ConfigError
from llmc.quant.fake_linear import ActQuantizer
from llmc.quant.quantizer import fake_quant
from llmc.registry import ALGORITHMS


class OsPlusOptions(Options):
    # LLMC's key: each subset's statistics are taken with the subsets before it already quantized
    true_sequential: bool = False
    use_shift: bool = True
    smooth_all: bool = False
    # the threshold search runs on the first N calibration batches (of each process); ranges use all
    search_batches: Optional[int] = None


def first_batches(job, names: list[str], n: Optional[int]) -> dict[str, list[torch.Tensor]]:
    """The named linears' inputs on the first n calibration batches (all when n is None)."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str, x: torch.Tensor) -> None:
        if n is None or len(got[name]) < n:
            got[name].append(x.to(job.ctx.activation_device))

    job.collect(names, keep)
    return got


def centred_ranges(fold: Fold, lo: torch.Tensor, hi: torch.Tensor, shift: bool):
    """(z or None, min of x - z, max of x - z) on the channels the fold's scale lives on."""
    lo, hi = fold.reduce(lo, "min"), fold.reduce(hi, "max")
    if not shift:
        return None, lo, hi
    z = (hi + lo) / 2
    return z, lo - z, hi - z


def thresholds(c_lo: torch.Tensor, c_hi: torch.Tensor) -> list[float]:
    """LLMC's grid of clipping thresholds: from the largest centred magnitude down to 1 in
    max(100, amax / 0.5) equal steps (amax: the largest positive centred value); empty when nothing passes 1."""
    amx, amn = max(c_hi.max().item(), 0.0), min(c_lo.min().item(), 0.0)
    top = max(-amn, amx)
    if top < 1:
        return []
    num = max(100, int(amx / 0.5))
    step = (top - 1) / num
    return [top - i * step for i in range(num + 1)]


def osplus_scales(c_lo: torch.Tensor, c_hi: torch.Tensor, t: float) -> torch.Tensor:
    """s_j = max(1, max|x_j - z_j| / t): only the channels whose centred range passes t are squeezed."""
    return torch.maximum(torch.maximum(c_hi / t, -c_lo / t), torch.ones_like(c_hi))


class QuantizedSubset:
    """Evaluates candidate (scale, shift) pairs on a subset without folding: each quantized linear takes
    Q_w(W s)/s as weight, b + (W - Q_w(W s)/s) z as bias and Q_a((x - z)/s)·s + z as input, which computes
    exactly Q_w(W s) Q_a((x - z)/s) + b + W z, the folded quantized linear."""

    def __init__(self, job, subset, layers: list[str], xs: list[torch.Tensor], wargs, aargs):
        self.linears = [job.module(n) for n in layers]
        self.weights = [lin.weight.data.clone() for lin in self.linears]
        self.biases = [None if lin.bias is None else lin.bias.data.clone() for lin in self.linears]
        self.wargs = wargs
        self.act = ActQuantizer(replace(aargs, static=False))  # static ranges are searched dynamically
        self.loss_of = forward_loss(job, subset, xs)

    def loss(self, full: torch.Tensor, z: Optional[torch.Tensor]) -> float:
        try:
            for lin, w, b in zip(self.linears, self.weights, self.biases):
                s = full.view(1, -1).to(w)
                wq = fake_quant(w * s, self.wargs) / s if self.wargs else w
                lin.weight.data.copy_(wq)
                if z is not None:
                    lin.bias.data.copy_(b + ((w - wq).float() @ z.float().to(w.device)).to(b.dtype))
            with _input_hooks(self.linears, lambda x: _smoothed_act_quant(self.act, x, full, z)):
                return self.loss_of()
        finally:
            self.restore()

    def restore(self) -> None:
        for lin, w, b in zip(self.linears, self.weights, self.biases):
            lin.weight.data.copy_(w)
            if b is not None:
                lin.bias.data.copy_(b)


@ALGORITHMS.register("OsPlus")
class OsPlus(Algorithm):
    name = "OsPlus"
    keeps_float = True
    folds = True
    Options = OsPlusOptions
    data_driven = True

    @classmethod
    def check(cls, config) -> None:
        opts = cls.Options.model_validate(config.quant.special)
        if opts.search_batches is not None and opts.search_batches < 1:
            raise ConfigError("quant.special.search_batches", f"{opts.search_batches}: expected an integer >= 1 "
                              "(or remove it to search on every calibration batch)")
        if config.quant.act is None:
            raise ConfigError("quant.act", f"{cls.name} moves activation outliers into the weights: an act "
                              "section is required (for weight-only quantization use AWQ)")

    def plans(self, job) -> dict[int, tuple]:
        """Per subset index: (quantized layers, fold) for the subsets this method transforms."""
        opts = self.options
        plans = {}
        for i, subset in enumerate(job.subsets):
            layers = job.quantized_layers(subset)
            prev = job.module(subset.prev_op) if subset.prev_op else None
            if not layers or (isinstance(prev, nn.Linear) and not opts.smooth_all):
                continue
            fold = fold_plan(job, subset, shift=opts.use_shift)
            if fold is not None:
                plans[i] = (layers, fold)
        return plans

    def apply(self, job, targets):
        opts = self.options
        plans = self.plans(job)
        stats = None
        if not opts.true_sequential:  # every subset's statistics from the float block, in one pass
            stats = self.statistics(job, sorted({job.subsets[i].input for i in plans}))
        qlinears = {}
        for i, subset in enumerate(job.subsets):
            if i in plans:
                layers, fold = plans[i]
                feats, lo, hi = stats or self.statistics(job, [subset.input])
                self.transform(job, subset, layers, fold, feats[subset.input], lo[subset.input], hi[subset.input])
                for q in qlinears.values():  # a fold into an installed prev_op (v_proj) changed its weight
                    if q.weight is fold.prev.weight:
                        q.set_weight_qparams()
            if opts.true_sequential:  # the next subset sees this one quantized
                installed = {n: self.install(job, n) for n in job.quantized_layers(subset)}
                for q in installed.values():
                    q.set_weight_qparams()
                self.calibrate_static_acts(job, installed)
                qlinears.update(installed)
        if not opts.true_sequential:
            qlinears = self.install_all(job)
            for q in qlinears.values():
                q.set_weight_qparams()
            self.calibrate_static_acts(job, qlinears)
        return {}

    def statistics(self, job, inputs: list[str]):
        feats = first_batches(job, inputs, self.options.search_batches)
        lo, hi = channel_ranges(job, inputs, feats if self.options.search_batches is None else None)
        return feats, lo, hi

    def transform(self, job, subset, layers, fold: Fold, xs, lo, hi) -> None:
        """Search the threshold, then fold the shift and the scale."""
        z, c_lo, c_hi = centred_ranges(fold, lo, hi, self.options.use_shift and fold.can_shift)
        grid = thresholds(c_lo, c_hi)
        best_t, best = None, None
        if grid:
            evaluate = QuantizedSubset(job, subset, layers, xs, self.wargs, self.aargs)
            zf = None if z is None else fold.expand(z)
            for t in grid:
                loss = evaluate.loss(fold.expand(osplus_scales(c_lo, c_hi, t)), zf)
                if best is None or loss < best:
                    best_t, best = t, loss
        s = osplus_scales(c_lo, c_hi, best_t) if best_t is not None else torch.ones_like(c_hi)
        fold.apply(s, z)
        logger.debug(f"{self.name} {job.full_name(subset.layers[0])}: threshold "
                     f"{'none' if best_t is None else f'{best_t:.3f}'} of {len(grid)}, "
                     f"{int((s > 1).sum())} channels scaled{', shifted' if z is not None else ''}")
