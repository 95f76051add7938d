"""AWQ (Lin et al., 2023): per-channel scales s that protect salient input channels, searched per subset
on a grid of ratios (s = x̄^r, or x̄^r / w̄^(1-r) for LLMC's v1) against the output error of the subset's
`inspect` module with quantized weights, then folded into `prev_op` so the float model is unchanged;
then an output-error search for per-group weight clipping (AutoAWQ's clip search).

As in AutoAWQ, all subset inputs are captured once from the float block; a fold divides the cached input
of its own subset by s, and losses are summed over every calibration batch before ratios are compared.
With an act section (W8A8, W4A4: step 1 of LLMC's awq_comb_omni) both searches quantize the inputs, as
LLMC does: the scaled input x/s in the scale search, the sampled tokens in the clip search, each with the
act quantizer made dynamic.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Literal, Optional

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import fold_plan, forward_loss, gram_loss
from llmc.algorithms.smoothquant import _input_hooks, _smoothed_act_quant
from llmc.quant.fake_linear import ActQuantizer
from llmc.quant.quantizer import QuantArgs, bind_global, calibrate, dequantize, fake_quant, grouped, qparams_from_range, quantize, row_range
from llmc.registry import ALGORITHMS


class AwqOptions(Options):
    trans: bool = True
    trans_version: str = "v2"
    weight_clip: bool = True
    # AutoAWQ clips to ±absmax; LLMC's default is the weight quantizer's symmetry (logged at the start)
    clip_sym: bool = True
    # v1 clips the weights; v2 keeps the weights and puts the clip range in the quantizer (for OmniQuant's
    # LWC), as does weight calib_algo: learnable.
    clip_version: Literal["v1", "v2"] = "v1"
    n_grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    save_scale: bool = False
    scale_path: Optional[str] = None
    save_clip: bool = False
    clip_path: Optional[str] = None
    # LLMC's memory knobs (its loss in chunks of awq_bs samples; tensors freed early): accepted, logged,
    # unused: llmc's search runs one calibration batch (calib.bs) at a time.
    awq_bs: Optional[int] = None
    save_mem: bool = True

    def outputs(self) -> dict[str, Optional[str]]:
        out = {}
        if self.save_scale:
            out["scales"] = self.scale_path
        if self.save_clip:
            out["clips"] = self.clip_path
        return out


@ALGORITHMS.register("Awq", "AWQ")
class Awq(Algorithm):
    name = "AWQ"
    folds = True
    Options = AwqOptions
    data_driven = True
    batch_invariant = True
    weight_calib_algos = ("learnable",)  # clips kept in the quantizer (not the weight) for OmniQuant's LWC
    mixes_bits = True

    def __init__(self, wargs: Optional[QuantArgs], aargs: Optional[QuantArgs], options: AwqOptions):
        super().__init__(wargs, aargs, options)
        # dynamic, as LLMC's searches quantize activations (fake_quant_act_dynamic) whatever the final mode
        self.search_act = ActQuantizer(replace(aargs, static=False)) if aargs is not None else None
        if options.weight_clip:
            logger.info("AWQ clip search: " + (
                "symmetric, to ±absmax per group (AutoAWQ's); LLMC's default follows the weight quantizer's "
                "symmetry: set clip_sym: False for asymmetric clipping" if options.clip_sym else
                "asymmetric, [min, max] per group (clip_sym: False); AutoAWQ's is symmetric ±absmax (clip_sym: True)"))
        if aargs is not None:
            logger.info(f"AWQ: the scale and clip searches quantize activations ({self.search_act.args.describe()})")
        ignored = sorted({"awq_bs", "save_mem"} & options.model_fields_set)
        if ignored:
            logger.info(f"AWQ: {'/'.join(ignored)} only bound memory in LLMC (loss in chunks of awq_bs samples, "
                        "tensors freed early); llmc's search holds one calibration batch at a time: ignored")

    @classmethod
    def produces(cls, options: AwqOptions) -> set[str]:
        return {k for k, on in (("scales", options.trans), ("clips", options.weight_clip)) if on}

    @classmethod
    def check(cls, config) -> None:
        from llmc.errors import ConfigError

        opts = AwqOptions.model_validate(config.quant.special)
        if opts.trans_version not in ("v1", "v2"):
            raise ConfigError("quant.special.trans_version", f"'{opts.trans_version}': expected v1 or v2")
        for kind, path in opts.outputs().items():
            if not path:
                raise ConfigError(f"quant.special.{kind[:-1]}_path", f"save_{kind[:-1]}: True needs a path")
        if config.quant.weight is None:
            raise ConfigError("quant.weight", "AWQ searches weight scales: a weight section is required")

    # ---- the block transform ----------------------------------------------------------------------
    def apply(self, job, targets):
        opts: AwqOptions = self.options
        feats = {n: xs for n, xs in job.capture(sorted({s.input for s in job.subsets})).items()}
        scales: dict[str, torch.Tensor] = {}
        if opts.trans:
            for subset in job.subsets:
                layers = job.quantized_layers(subset)
                if not layers:
                    continue
                fold = fold_plan(job, subset)
                if fold is None:
                    continue
                s = self._search_scale(job, subset, layers, feats[subset.input], fold)
                full = fold.apply(s)
                feats[subset.input] = [x / full.to(x.dtype) for x in feats[subset.input]]
                for name in layers:
                    scales[job.full_name(name)] = full.detach().cpu()
        clips = {}
        if opts.weight_clip:
            for subset in job.subsets:
                for name in job.quantized_layers(subset):
                    if name in job.score_layers:
                        continue
                    clips[job.full_name(name)] = self._clip(job.module(name), feats[subset.input],
                                                              job.inputs.token_index, job.ctx.reduce,
                                                              self.args_of(job, name)[0])
        qlinears = self.install_all(job)
        for name, q in qlinears.items():
            clip = clips.get(job.full_name(name)) if self._keeps_clips else None
            if clip is None:
                q.set_weight_qparams()
            else:  # the clipped range, as if the weight were clipped, sets the grid; the weight stays
                wmin, wmax = row_range(grouped(q.weight.detach().float(), q.wargs))
                lo, hi = (c.to(q.weight.device).reshape(-1, 1) for c in clip)
                q.set_weight_qparams(*qparams_from_range(torch.maximum(lo, wmin), torch.minimum(hi, wmax), q.wargs))
        self.calibrate_static_acts(job, qlinears)
        state = {}
        if scales:
            state["scales"] = scales
        if clips:
            state["clips"] = {f"{k}.{side}": v[i] for k, v in clips.items() for i, side in enumerate(("min", "max"))}
        return state

    # ---- scale search -----------------------------------------------------------------------------
    def _search_scale(self, job, subset, layers, xs: list[torch.Tensor], fold) -> torch.Tensor:
        opts: AwqOptions = self.options
        ctx = job.ctx
        x_sum = sum(x.abs().reshape(-1, x.shape[-1]).float().sum(0) for x in xs)
        tokens = sum(x.numel() // x.shape[-1] for x in xs)
        x_mean = ctx.reduce(x_sum) / ctx.reduce(torch.tensor(float(tokens), device=x_sum.device))
        x_mean = fold.reduce(x_mean, "mean")  # GQA: one scale per key/value channel
        linears = [job.module(n) for n in layers]
        originals = [lin.weight.data.clone() for lin in linears]
        grids = [self.args_of(job, n)[0] for n in layers]  # quant.mix_bits may set a linear apart
        w_mean = None
        if opts.trans_version == "v1":
            w_mean = fold.reduce(sum(self._weight_mean(w, a) for w, a in zip(originals, grids)) / len(originals),
                                 "mean")
        act = self.search_act
        # The Gram shortcut has no place for quantized inputs: with activation quantization, forwards.
        if act is None and subset.inspect == layers[0] and len(layers) == 1 and not subset.has_kwargs:
            loss_of = gram_loss(ctx, linears[0], originals[0], xs)
        else:
            loss_of = forward_loss(job, subset, xs)
        best, best_loss = None, float("inf")
        losses = []
        try:
            for r in range(opts.n_grid):
                ratio = r / opts.n_grid
                s = x_mean.pow(ratio) if w_mean is None else x_mean.pow(ratio) / w_mean.pow(1 - ratio)
                s = s.clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                full = fold.expand(s)
                for lin, w, a in zip(linears, originals, grids):
                    lin.weight.data.copy_(fake_quant(w * full.view(1, -1).to(w.dtype), a) / full.view(1, -1))
                # Q(W s)/s on Q_a(x/s)·s is LLMC's Q(W s) on Q_a(x/s), without folding each candidate
                hooks = nullcontext() if act is None else _input_hooks(
                    linears, lambda x, full=full: _smoothed_act_quant(act, x, full, None))
                with hooks:
                    loss = loss_of()
                losses.append(loss)
                if loss < best_loss:
                    best, best_loss = s.clone(), loss
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data.copy_(w)
        logger.debug(f"AWQ {job.full_name(layers[0])}: best ratio {losses.index(best_loss) / opts.n_grid:.2f} "
                     f"(loss {best_loss:.6g})")
        return best

    def _weight_mean(self, w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
        groups = w.abs().reshape(-1, args.group_size if args.granularity == "per_group" else w.shape[1])
        return (groups / groups.amax(dim=1, keepdim=True).clamp(min=1e-8)).reshape(w.shape).float().mean(0)

    # ---- clip search ------------------------------------------------------------------------------
    @property
    def _keeps_clips(self) -> bool:
        return self.wargs.calib_algo == "learnable" or self.options.clip_version == "v2"

    def _clip(self, linear, xs: list[torch.Tensor], token_index: Optional[list[torch.Tensor]] = None,
              reduce: Callable = lambda t: t, wargs: Optional[QuantArgs] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Search per-group clip values; apply them to the weight, or (weight `calib_algo: learnable`)
        keep the weight and put them in the quantizer, as the initial range OmniQuant's LWC refines."""
        opts: AwqOptions = self.options
        lo, hi = clip_search(linear.weight.data, xs, wargs or self.wargs, opts.clip_sym, opts.clip_grid, opts.max_shrink,
                             opts.clip_tokens, token_index, reduce, self.search_act)
        if not self._keeps_clips:
            w = linear.weight.data
            groups = lo.shape[1]
            clipped = torch.clamp(w.float().view(w.shape[0], groups, -1), lo.unsqueeze(-1), hi.unsqueeze(-1))
            w.copy_(clipped.view_as(w).to(w.dtype))
        return lo.cpu(), hi.cpu()


@torch.no_grad()
def clip_search(weight: torch.Tensor, xs: list[torch.Tensor], args: QuantArgs, sym: bool, grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, token_index: Optional[list[torch.Tensor]] = None,
                reduce: Callable = lambda t: t, act: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's clip search: per output channel and group, [min, max] shrunk by 1 - i/grid (i < max_shrink·grid)
    minimising the group's partial-output error on `n_tokens` sampled tokens. Returns ([out, groups] x 2).
    With `act`, the candidates see quantized inputs and are compared with the float layer's output, as LLMC's
    auto_clip does when activations are quantized.

    Each group's partial output x_g · w_g is a batched matmul over groups, so the search runs at
    matmul speed rather than as a broadcast multiply (30x faster on CPU). The sampled tokens are every
    step-th of all calibration tokens by global index, so data-parallel ranks (each holding a share,
    `token_index`) sample together what one process would, and sum their errors through `reduce`."""
    w = weight.float()
    args = bind_global(args, w)  # NVFP4: every candidate under the global scale of the unclipped weight
    co, ci = w.shape
    gs = args.group_size if args.granularity == "per_group" else ci
    n_groups = ci // gs
    sizes = [t.numel() // ci for t in xs]
    index = torch.cat(token_index) if token_index is not None else torch.arange(sum(sizes))
    step = max(1, int(reduce(torch.tensor(float(sum(sizes)), device=w.device)).item()) // n_tokens)
    keep = ((index % step == 0) & (index < step * n_tokens)).split(sizes)

    def sampled_tokens(batches) -> torch.Tensor:  # [G, T, gs], the kept tokens of every batch
        x = torch.cat([t.reshape(-1, ci)[k.to(t.device)].float().to(w.device) for t, k in zip(batches, keep)])
        return x.view(-1, n_groups, gs).transpose(0, 1)

    xg = sampled_tokens(xs)
    # With act, each batch is quantized as the model's forward would (each token over its full width);
    # LLMC quantizes the grouped view [1, T, G, gs], where a per-token range covers one group of one token:
    # a quirk not followed.
    xq = xg if act is None else sampled_tokens([act(t) for t in xs])
    sampled = reduce(torch.tensor(float(xg.shape[1]), device=w.device))
    # Bound the [G, T, rows] outputs; from the global count, so every rank makes the same reductions.
    chunk = max(1, (1 << 26) // (n_groups * max(1, int(sampled.item()))))
    lo_all, hi_all = [], []
    for o in range(0, co, chunk):
        wb = w[o:o + chunk].view(-1, n_groups, gs)                      # [rows, G, gs]
        org_out = torch.bmm(xg, wb.permute(1, 2, 0))                    # [G, T, rows]
        org_max, org_min = wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True)
        if sym:
            org_max = torch.maximum(org_max.abs(), org_min.abs())
            org_min = -org_max
        best_lo, best_hi = org_min.clone(), org_max.clone()
        best_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * grid)):
            hi = org_max * (1 - i / grid)
            lo = org_min * (1 - i / grid)
            flat = torch.clamp(wb, lo, hi).reshape(-1, gs)
            scale, zero = calibrate(flat, args)
            q = dequantize(quantize(flat, scale, zero, args), scale, zero).view_as(wb)
            out = torch.bmm(xq, q.permute(1, 2, 0))
            err = reduce((out - org_out).pow(2).sum(dim=1)).div_(sampled).t().unsqueeze(-1)  # [rows, G, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_hi = torch.where(better, hi, best_hi)
            best_lo = torch.where(better, lo, best_lo)
        lo_all.append(best_lo.reshape(-1, n_groups))
        hi_all.append(best_hi.reshape(-1, n_groups))
    return torch.cat(lo_all), torch.cat(hi_all)
