"""DGQ (Zhang et al., 2023, "Dual Grained Quantization"), as LLMC computes it, for A8W4: weights on 4-bit
groups (`weight.w_1`, asymmetric, codes [0, 15]) whose scales are integer multiples of an 8-bit per-channel
scale (`weight.w_2`), so a kernel dequantizes 4-bit codes to int8 with integer group scales and runs an
int8 GEMM with one float scale per output channel.

Per subset, before the search:
  - behind a norm: SmoothQuant with alpha 0.5, s = sqrt(max|X|) / sqrt(max|W|), folded into the norm;
  - behind a linear (LLMC: Llama's up_proj -> down_proj): percentile smoothing: with s the same SmoothQuant
    scale and b its int(0.005·C + 1.5)-th largest value, the channels above b are divided by s / b in
    prev_op's rows and multiplied into the subset's columns (exact for the float model; skipped when b < 1e-4).
Per linear, on the inputs it now receives (activations fake-quantized when there is an act section):
  1. each group g, as a per-channel 4-bit quantization of W[:, g]: the weight clipped cumulatively to
     ratio·[min, max], ratio = 1.02 - 0.22·(i + 1)/20 for i < 20, the (scale, zero) with the least mean
     squared error of X_g W_g^T per output channel kept;
  2. the 8-bit channel scale s8 = max|clip(W, ±ratio·max|W|)| / 127, ratio = 1.02 - 0.82·(i + 1)/80 for
     i < 80, evaluated with group scales round(scale / s8)·s8, kept per output channel by the same error;
  3. the grid: integer group scale k = max(1, round(scale / s8)), effective scale k·s8, codes clamped to
     [max(0, z - round(127 / k)), min(15, z + round(127 / k))] so that k·(code - z) fits int8.
LLMC differs in three places, each a defect there: it searches with the inputs captured before the smoothing
(against the smoothed weights), with only the first calibration batch, and its activation fake-quant call in
the search fails (`a_qdq` without its module argument), so its dgq_w_a.yml cannot run; here the inputs are
those the smoothed layer reads, every calibration token counts (errors summed over batches and processes),
and the activations are quantized per token over the whole input as the deployed model does.
"""
from __future__ import annotations

from typing import Optional

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import channel_ranges, fold_plan
from llmc.errors import ConfigError
from llmc.quant.fake_linear import ActQuantizer
from llmc.registry import ALGORITHMS

GROUP_GRID, CHANNEL_GRID = 20, 80
QMIN, QMAX, INT8_MAX = 0.0, 15.0, 127.0


class DGQOptions(Options):
    pass


@ALGORITHMS.register("DGQ")
class DGQ(Algorithm):
    name = "DGQ"
    Options = DGQOptions
    data_driven = True
    keeps_float = True  # float weights change only by the smoothing folds
    folds = True

    @classmethod
    def check(cls, config) -> None:
        w, a = config.quant.weight, config.quant.act
        if w is None or w.w_1 is None:
            raise ConfigError("quant.weight", "DGQ takes two weight levels: w_1 (4-bit groups, e.g. bit 4, symmetric "
                              "False, per_group, group_size 128) and w_2 (8-bit per_channel, symmetric)")
        w1, w2 = w.w_1, w.w_2
        if w1.bit != 4 or w1.symmetric or w1.granularity != "per_group" or w1.quant_type != "int-quant":
            raise ConfigError("quant.weight.w_1", f"bit {w1.bit}, symmetric {w1.symmetric}, granularity "
                              f"{w1.granularity}: DGQ's fine level is asymmetric 4-bit groups (codes [0, 15]); set "
                              "bit: 4, symmetric: False, granularity: per_group")
        if w2.bit != 8 or not w2.symmetric or w2.granularity != "per_channel" or w2.quant_type != "int-quant":
            raise ConfigError("quant.weight.w_2", f"bit {w2.bit}, symmetric {w2.symmetric}, granularity "
                              f"{w2.granularity}: DGQ's coarse level is symmetric int8 per output channel; set bit: 8, "
                              "symmetric: True, granularity: per_channel")
        for key, spec in (("w_1", w1), ("w_2", w2)):
            if spec.calib_algo != "minmax" or spec.w_1 is not None or spec.bit == 48:
                raise ConfigError(f"quant.weight.{key}", "DGQ searches the ranges itself: plain minmax settings only")
        if a is not None and (a.static or a.quant_type != "int-quant" or a.bit != 8):
            raise ConfigError("quant.act", f"bit {a.bit}, static {a.static}: DGQ is A8W4 with dynamic int8 "
                              "activations (LLMC's dgq_w_a: bit 8, per_token)")

    def apply(self, job, targets):
        layers = {n: s for s in job.subsets for n in job.quantized_layers(s)}
        names = sorted({s.input for s in job.subsets if job.quantized_layers(s)}
                       | {s.input_of(n) for n, s in layers.items()})
        feats = job.capture(names)
        divisor: dict[str, torch.Tensor] = {}  # a subset input's scale now folded in front of its linears
        for subset in job.subsets:
            if not job.quantized_layers(subset):
                continue
            full = self._smooth(job, subset, feats[subset.input])
            if full is not None:
                for name in subset.layers:
                    divisor[name] = full
        act = ActQuantizer(self.aargs) if self.aargs is not None else None
        for name, subset in layers.items():
            lin = job.module(name)
            d = divisor.get(name)
            xs = [x.to(lin.weight.device).float() / (1 if d is None else d.to(x.device).float())
                  for x in feats[subset.input_of(name)]]
            xs = [x.reshape(-1, x.shape[-1]) for x in xs]
            xqs = [act(x) for x in xs] if act is not None else xs
            w = lin.weight.detach().float()
            g = self.wargs.group_size
            scales, zeros = group_search(xs, xqs, w, g, job.ctx.reduce)
            scale8 = channel_search(xs, xqs, w, scales, zeros, g, job.ctx.reduce)
            codes, scale, zero = dgq_grid(w, torch.round(scales / scale8.view(-1, 1)).clamp(min=1.0), zeros, scale8, g)
            self.install(job, name).set_weight_qparams(scale, zero, codes=codes)
            del xs, xqs
        return {}

    @torch.no_grad()
    def _smooth(self, job, subset, xs: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """The subset's smoothing (norm: SmoothQuant alpha 0.5; linear: percentile smoothing), folded in place;
        returns the scale over the subset's inputs (None when nothing was folded)."""
        fold = fold_plan(job, subset)
        if fold is None:
            return None
        lo, hi = channel_ranges(job, [subset.input], {subset.input: xs})
        x_max = fold.reduce(torch.maximum(lo[subset.input].abs(), hi[subset.input].abs()), "max")
        w_max = torch.stack([job.module(n).weight.detach().abs().amax(0).float() for n in subset.layers]).amax(0)
        w_max = fold.reduce(w_max, "max").clamp(min=1e-5)
        s = (x_max.pow(0.5) / w_max.pow(0.5)).clamp(min=1e-5)
        if isinstance(fold.prev, nn.Linear):
            s = percentile_scales(s)
            if s is None:
                logger.info(f"DGQ {job.full_name(subset.layers[0])}: no channel above 1e-4, not smoothed")
                return None
        return fold.apply(s.to(x_max.device))


def percentile_scales(s: torch.Tensor) -> Optional[torch.Tensor]:
    """LLMC's smooth_llama_mlp: the channels above the int(0.005·C + 1.5)-th largest value b divided by b,
    the rest 1; None when b < 1e-4."""
    ordered = s.sort().values
    baseline = ordered[-int(len(s) * 0.005 + 1.5)]
    if baseline < 1e-4:
        return None
    scales = s / baseline
    scales[s <= baseline] = 1.0
    return scales


def _asym4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLMC's IntegerQuantizer.get_qparams, 4-bit asymmetric per row: ranges not widened to include 0."""
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-5) / (QMAX - QMIN)
    return scale, (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX)


def _qdq(w, scale, zero, lower, upper) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero, lower, upper) - zero) * scale


def _sq_err(orgs, xqs, w_fq, cols=slice(None)) -> torch.Tensor:
    """Per output channel, the squared error of the float outputs `orgs` against xq W_fq^T, summed over
    every token of every batch (LLMC takes the mean over its one batch: the same ranking)."""
    return sum((org - xq[:, cols] @ w_fq.T).pow(2).sum(0) for org, xq in zip(orgs, xqs))


@torch.no_grad()
def group_search(xs, xqs, w: torch.Tensor, g: int, reduce=lambda t, op: t) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: per group, the 4-bit (scale, zero) [out, groups] of the least output error over the cumulative
    clipping grid."""
    out, cols = w.shape
    scales, zeros = torch.ones(out, cols // g), torch.ones(out, cols // g)
    scales, zeros = scales.to(w.device), zeros.to(w.device)
    for j in range(cols // g):
        part = slice(j * g, (j + 1) * g)
        wg = w[:, part]
        w_min, w_max = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        orgs = [x[:, part] @ wg.T for x in xs]
        best = torch.full((out,), float("inf"), device=w.device)
        for i in range(GROUP_GRID):
            ratio = 1.02 - (i + 1) / GROUP_GRID * 0.22
            wg = wg.clamp(w_min * ratio, w_max * ratio)
            scale, zero = _asym4(wg)
            loss = reduce(_sq_err(orgs, xqs, _qdq(wg, scale, zero, QMIN, QMAX), part), "sum")
            better = loss < best
            best = torch.where(better, loss, best)
            scales[better, j], zeros[better, j] = scale.view(-1)[better], zero.view(-1)[better]
    return scales, zeros


@torch.no_grad()
def channel_search(xs, xqs, w: torch.Tensor, scales, zeros, g: int, reduce=lambda t, op: t) -> torch.Tensor:
    """Step 2: the int8 channel scale [out] of the least output error over the clipping grid, each candidate
    evaluated with group scales rounded to its integer multiples (LLMC bounds the codes by round(127 / s8)
    here, which leaves [0, 15] in force)."""
    out, cols = w.shape
    best = torch.full((out,), float("inf"), device=w.device)
    best_s8 = torch.zeros(out, device=w.device)
    absmax = w.abs().amax(-1, keepdim=True)
    orgs = [x @ w.T for x in xs]
    for i in range(CHANNEL_GRID):
        ratio = 1.02 - (i + 1) / CHANNEL_GRID * 0.82
        clipped = w.clamp(-absmax * ratio, absmax * ratio)
        s8 = clipped.abs().amax(-1, keepdim=True).clamp(min=1e-5) / INT8_MAX
        k = torch.round(scales / s8).clamp(min=1.0)
        int_max = torch.round(INT8_MAX / s8)
        upper = torch.clamp(zeros + int_max, max=QMAX).reshape(-1, 1)
        lower = torch.clamp(zeros - int_max, min=QMIN).reshape(-1, 1)
        fq = _qdq(w.reshape(-1, g), (k * s8).reshape(-1, 1), zeros.reshape(-1, 1), lower, upper).reshape(w.shape)
        loss = reduce(_sq_err(orgs, xqs, fq), "sum")
        better = loss < best
        best = torch.where(better, loss, best)
        best_s8[better] = s8.view(-1)[better]
    return best_s8


def dgq_grid(w: torch.Tensor, k: torch.Tensor, zeros: torch.Tensor, scale8: torch.Tensor, g: int):
    """Step 3 (LLMC's DGQ.w_qdq): codes, scale k·s8 and zero per group of w.reshape(-1, g)."""
    scale = (k * scale8.view(-1, 1)).reshape(-1, 1)
    int_max = torch.round(INT8_MAX / k)
    upper = torch.clamp(zeros + int_max, max=QMAX).reshape(-1, 1)
    lower = torch.clamp(zeros - int_max, min=QMIN).reshape(-1, 1)
    zero = zeros.reshape(-1, 1)
    codes = torch.clamp(torch.round(w.reshape(-1, g) / scale) + zero, lower, upper)
    return codes, scale, zero
