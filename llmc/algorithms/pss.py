"""PiecewiseSearchSmooth (PaddleSlim's LLM quantization): SmoothQuant's smoothing scales searched piece
by piece, with OS+'s channel shift, over every subset whose input can take a scale.

Per subset, the input channels are split into `k_piece` pieces by 1-D k-means on their (centred) absolute
maximum; piece by piece from the smallest magnitudes up, a value is searched for that piece's channels
alone (the pieces already searched keep theirs, the others stay at 1): either an alpha, giving
s = max|x|^alpha / max|W|^(1-alpha) (alpha from search_alpha_min to search_alpha_max by 0.01), or a constant
scale (search_scale_min to search_scale_max by 0.5). The loss is PaddleSlim's: the mean squared error of
each quantized linear's output, Q_a((x - z)/s) Q_w(W s)^T against (x - z) W^T, summed over the subset.
`search_piece` tries 1..k_piece pieces and keeps the count with the least loss.

A method of its own rather than a SmoothQuant option: its keys (pieces, two grids) mean nothing to
SmoothQuant's single alpha, and it shares OS+'s plan (shift where a bias takes it, statistics, folds).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from loguru import logger

from llmc.algorithms.osplus import OsPlus, OsPlusOptions, centred_ranges
from llmc.algorithms.smoothquant import smoothing_scales
from llmc.errors import ConfigError
from llmc.quant.fake_linear import ActQuantizer
from llmc.quant.quantizer import fake_quant
from llmc.registry import ALGORITHMS


class PSSOptions(OsPlusOptions):
    smooth_all: bool = True  # "extended to all linear layers": every subset whose prev_op takes a scale
    k_piece: int = 3
    search_piece: bool = False
    search_alpha_min: float = 0.2
    search_alpha_max: float = 0.8
    search_scale_min: Optional[float] = 1.0
    search_scale_max: Optional[float] = 5.0

    def candidates(self) -> list[tuple[str, float]]:
        """("alpha", a) on a 0.01 grid, then ("scale", c) on a 0.5 grid, both ends included."""
        n = int(round((self.search_alpha_max - self.search_alpha_min) / 0.01))
        out = [("alpha", round(self.search_alpha_min + i * 0.01, 4)) for i in range(n + 1)]
        if self.search_scale_max is not None:
            m = int((self.search_scale_max - self.search_scale_min) / 0.5 + 1e-9)
            out += [("scale", self.search_scale_min + i * 0.5) for i in range(m + 1)]
        return out


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 100) -> list[torch.Tensor]:
    """Lloyd's k-means on scalars, started from evenly spaced quantiles (deterministic); the non-empty
    clusters as index tensors, by ascending centroid."""
    v = values.float().flatten()
    k = min(k, v.numel())
    centroids = torch.quantile(v, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    labels = None
    for _ in range(iters):
        new = (v[:, None] - centroids[None, :]).abs().argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([v[labels == c].mean() if (labels == c).any() else centroids[c] for c in range(k)])
    pieces = [torch.nonzero(labels == c).flatten() for c in centroids.argsort().tolist()]
    return [p for p in pieces if p.numel()]


def piecewise_search(x_absmax: torch.Tensor, w_absmax: torch.Tensor, loss_of: Callable[[torch.Tensor], float],
                     opts: PSSOptions) -> tuple[torch.Tensor, float]:
    """Scales over the channels and their loss: per piece (ascending magnitude) the candidate of least loss
    (the last of equal ones, as PaddleSlim), with every count of pieces up to k_piece when search_piece."""
    counts = range(1, opts.k_piece + 1) if opts.search_piece else [opts.k_piece]
    smooth = {a: smoothing_scales(x_absmax, w_absmax, a) for kind, a in opts.candidates() if kind == "alpha"}
    best_s, best_loss = None, None
    for k in counts:
        s = torch.ones_like(x_absmax)
        loss = None
        for piece in kmeans_1d(x_absmax, k):
            chosen, loss = None, None
            for kind, value in opts.candidates():
                trial = s.clone()
                trial[piece] = smooth[value][piece] if kind == "alpha" else value
                cur = loss_of(trial)
                if loss is None or cur <= loss:
                    chosen, loss = trial, cur
            s = chosen
        if best_loss is None or loss < best_loss:
            best_s, best_loss = s, loss
    return best_s, best_loss


class LinearLoss:
    """PaddleSlim's loss over a subset's quantized linears, on their captured inputs less the shift."""

    def __init__(self, ctx, linears, xs: list[torch.Tensor], z: Optional[torch.Tensor], wargs, aargs):
        self.ctx, self.wargs = ctx, wargs
        self.weights = [lin.weight.detach().float() for lin in linears]
        self.xs = [x.reshape(-1, x.shape[-1]).float() - (0 if z is None else z.float().to(x.device)) for x in xs]
        self.refs = [[x @ w.t().to(x.device) for w in self.weights] for x in self.xs]
        self.act = ActQuantizer(replace(aargs, static=False))  # static ranges are searched dynamically

    @torch.no_grad()
    def __call__(self, full: torch.Tensor) -> float:
        total = torch.zeros((), device=self.ctx.device)
        count = 0
        wq = [fake_quant(w * full.view(1, -1).to(w), self.wargs) if self.wargs else w * full.view(1, -1).to(w)
              for w in self.weights]
        for x, refs in zip(self.xs, self.refs):
            xq = self.act(x / full.to(x))
            for w, ref in zip(wq, refs):
                total += (xq @ w.t().to(x.device) - ref).pow(2).sum().to(total.device)
                count += ref.numel()
        return (self.ctx.reduce(total) / self.ctx.reduce(torch.tensor(float(count), device=total.device))).item()


@ALGORITHMS.register("PSS", "PiecewiseSearchSmooth")
class PSS(OsPlus):
    name = "PSS"
    Options = PSSOptions

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        opts = PSSOptions.model_validate(config.quant.special)
        if opts.k_piece < 1:
            raise ConfigError("quant.special.k_piece", f"{opts.k_piece}: expected an integer >= 1")
        if not 0 <= opts.search_alpha_min <= opts.search_alpha_max <= 1:
            raise ConfigError("quant.special.search_alpha_min", f"[{opts.search_alpha_min}, "
                              f"{opts.search_alpha_max}]: expected 0 <= search_alpha_min <= search_alpha_max <= 1")
        if (opts.search_scale_min is None) != (opts.search_scale_max is None):
            raise ConfigError("quant.special.search_scale_max", "search_scale_min and search_scale_max go "
                              "together: give both, or null both to search alphas only")
        if opts.search_scale_max is not None and not 0 < opts.search_scale_min <= opts.search_scale_max:
            raise ConfigError("quant.special.search_scale_min", f"[{opts.search_scale_min}, "
                              f"{opts.search_scale_max}]: expected 0 < search_scale_min <= search_scale_max")

    def transform(self, job, subset, layers, fold, xs, lo, hi) -> None:
        z, c_lo, c_hi = centred_ranges(fold, lo, hi, self.options.use_shift and fold.can_shift)
        x_absmax = torch.maximum(c_hi.abs(), c_lo.abs())
        w_absmax = fold.reduce(torch.stack([job.module(n).weight.detach().abs().amax(0).float()
                                            for n in subset.layers]).amax(0), "max")
        loss = LinearLoss(job.ctx, [job.module(n) for n in layers], xs, None if z is None else fold.expand(z),
                          self.wargs, self.aargs)
        s, best = piecewise_search(x_absmax, w_absmax, lambda s: loss(fold.expand(s)), self.options)
        fold.apply(s, z)
        logger.debug(f"PSS {job.full_name(subset.layers[0])}: loss {best:.3g}, scales "
                     f"[{s.min().item():.3g}, {s.max().item():.3g}]{', shifted' if z is not None else ''}")
