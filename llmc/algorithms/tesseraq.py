"""TesseraQ (Li et al., 2024): per block, a soft rounding variable per weight, h = rectified_sigmoid(alpha) in
[0, 1] with codes floor(w/s) + h + z, started AdaRound-style at the fractional part of w/s (so the block starts
at its float weights); then progressive adaptive rounding: for each threshold t of `thresholds`, the variables
of each linear whose |h - 0.5| lies above the t-quantile of all its scores are hardened (alpha = ±inf, rounding
up where h > 0.5), and the rest are trained for `iterations` Adam steps on the block reconstruction loss
against the float block (LLMC's l2: squared error summed over channels, averaged over tokens), mini-batches of
`batch_size` random calibration samples. With `optimize_scale` each grid row's scale is also trained as
s·2·rectified_sigmoid(v), v from 0 (LLMC's dequantization scale tuning). At the end every variable is hard,
the weight is left on an ordinary integer grid (weight = dequantized codes, scale s·factor), so fake-quant and
every packed export hold the same codes.

LLMC's hand-off from AWQ: `load_transform` folds AWQ's saved scales (`scale_path`, or an earlier stage) into the
original block; `weight_clip` with `clip_version: v2` starts the grid from AWQ's clips (`clip_path`, or an
earlier stage), with `v1` it runs AWQ's clip search here and clips the weights.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Optional

import numpy as np
import torch
from loguru import logger
from pydantic import Field
from torch import nn

from llmc.algorithms.awq import clip_search
from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.equivalence import fold_plan
from llmc.algorithms.minibatch import backward_mean, sample_ids
from llmc.errors import ConfigError, UserError
from llmc.quant.quantizer import QuantArgs, calibrate, dequantize, grouped, qparams_from_range, row_range, store_scale
from llmc.registry import ALGORITHMS

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch (AdaRound's, LLMC's RectifiedSigmoid(-0.1, 1.1))
SCALE_WEIGHT_DECAY = 1e-4  # LLMC's fixed weight decay on the scale factors
# LLMC's shipped TesseraQ configs (configs/quantization/methods/Tesseraq, backend/vllm/tesseraq_w4a16)
THRESHOLDS = [0.75, 0.5, 0.375, 0.25, 0.125, 0.09, 0.06, 0.04, 0.02, 0.005]


def rectified_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(x) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rectified_sigmoid_inverse(y: torch.Tensor) -> torch.Tensor:
    return -torch.log((ZETA - GAMMA) / (y - GAMMA) - 1)


class TesseraQOptions(Options):
    # defaults: LLMC's shipped configs (its code's own defaults, lr None and no thresholds, train nothing)
    lr: float = Field(5e-4, gt=0)
    iterations: int = Field(250, ge=0)            # Adam steps per threshold
    wd: Optional[float] = 0.0                     # read by LLMC but never applied: only 0 is accepted
    batch_size: int = Field(2, ge=1)              # calibration samples per step
    deactive_amp: bool = False                    # True: float32 forwards; False: model.compute_dtype autocast
    aug_loss: bool = False                        # also fit the float block's output on the block's own inputs
    optimize_scale: bool = True
    scale_lr: Optional[float] = Field(None, gt=0)  # None: lr
    thresholds: list[float] = Field(default_factory=lambda: list(THRESHOLDS))
    weight_clip: bool = False
    clip_version: Literal["v1", "v2"] = "v1"      # v1: AWQ's clip search here, clipping weights; v2: AWQ's clips
    clip_sym: Optional[bool] = None               # v1's search: None follows the weight quantizer (LLMC)
    load_transform: bool = False
    reduce_memory: bool = False                   # LLMC's memory knob (block back to the model dtype)
    scale_path: Optional[str] = None
    clip_path: Optional[str] = None

    def inputs(self) -> dict[str, str]:
        out = {}
        if self.load_transform:
            out["scales"] = self.scale_path
        if self.weight_clip and self.clip_version == "v2":
            out["clips"] = self.clip_path
        return out


class SoftRounding(nn.Module):
    """One linear's TesseraQ variables over grouped(weight) on a fixed grid (scale, zero): codes
    clamp(floor(w/s) + h(alpha) + z), dequantized with s·2·h(v) when the scale is tuned."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
                 optimize_scale: bool):
        super().__init__()
        self.args = args
        wg = grouped(weight.detach().float(), args)
        t = wg / scale
        down = torch.floor(t)
        self.register_buffer("base", down + zero)  # the code when rounding down
        self.register_buffer("nearest_up", torch.round(t) > down)  # round-to-nearest's choice, for the log
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero", zero.detach().clone())
        self.alpha = nn.Parameter(rectified_sigmoid_inverse(t - down))  # h starts at the fractional part
        self.factor = nn.Parameter(torch.zeros_like(scale)) if optimize_scale else None

    def out_scale(self) -> torch.Tensor:
        return self.scale if self.factor is None else self.scale * (2 * rectified_sigmoid(self.factor))

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        out = _SoftQDQ.apply(self.alpha, self.out_scale(), self.base, self.zero, float(self.args.qmin),
                             float(self.args.qmax))
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def harden(self, threshold: float) -> None:
        """Fix the variables whose |h - 0.5| exceeds the `threshold`-quantile of the layer's scores (hard
        ones score 0.5 and count), as LLMC's update_mask: to 1 (alpha = inf) above 0.5, to 0 below."""
        h = rectified_sigmoid(self.alpha)
        score = (h - 0.5).abs().cpu().numpy()
        value = np.float32(np.quantile(score, q=threshold))
        self.alpha[h > float(value + np.float32(0.5))] = float("inf")
        self.alpha[h < float(np.float32(0.5) - value)] = -float("inf")

    def soft_fraction(self) -> float:
        return torch.isfinite(self.alpha).float().mean().item()

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Every variable hard: rounded up where h > 0.5 (alpha > 0)."""
        return torch.clamp(self.base + (self.alpha > 0).float(), self.args.qmin, self.args.qmax)

    @torch.no_grad()
    def on_grid(self, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(weight, scale, zero, fraction of codes off round-to-nearest): the weight as its codes put it."""
        scale = self.out_scale().detach().clamp(min=torch.finfo(torch.float32).eps)
        scale = store_scale(scale, self.args)  # as a checkpoint will store it
        codes = self.codes()
        flipped = ((self.alpha > 0) != self.nearest_up).float().mean().item()  # LLMC's change ratio
        return dequantize(codes, scale, self.zero).reshape(shape), scale, self.zero, flipped


def _adam(groups: list[dict], lr: float) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel (a step over the rounding variables ran 10x faster on CPU)."""
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(groups, lr=lr)


class _SoftQDQ(torch.autograd.Function):
    """(clamp(base + h(alpha), qmin, qmax) - zero)·scale, h the rectified sigmoid, with the gradients autograd
    would give (both clamps pass gradient inside their bounds, bounds included) in a third of the passes over
    the weight: alpha gets g·scale·1.2·σ(1-σ) inside both clamps, scale Σ g·(q - zero) over its row."""

    @staticmethod
    def forward(ctx, alpha, scale, base, zero, qmin: float, qmax: float):
        sg = torch.sigmoid(alpha)
        v = sg.mul(ZETA - GAMMA).add_(GAMMA)
        inside = (v >= 0) & (v <= 1)
        v.clamp_(0, 1).add_(base)
        inside &= (v >= qmin) & (v <= qmax)
        q = v.clamp_(qmin, qmax).sub_(zero)
        slope = torch.addcmul(sg, sg, sg, value=-1).mul_(ZETA - GAMMA).masked_fill_(~inside, 0)  # dh/dalpha
        ctx.save_for_backward(slope, q, scale)
        return q * scale

    @staticmethod
    def backward(ctx, g):
        slope, q, scale = ctx.saved_tensors
        galpha = (g * scale).mul_(slope) if ctx.needs_input_grad[0] else None
        gscale = (g * q).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        return galpha, gscale, None, None, None, None


@ALGORITHMS.register("TesseraQ")
class TesseraQ(Algorithm):
    name = "TesseraQ"
    Options = TesseraQOptions
    data_driven = True
    needs_targets = True
    folds = False  # True on instances with load_transform (AWQ's scales folded: the engine checks the folds)
    weight_calib_algos = ("learnable",)  # LLMC's configs name it; the grid comes from the clips or min/max
    mixes_bits = True  # each linear's rounding is learned on its own grid

    def __init__(self, wargs, aargs, options: TesseraQOptions):
        super().__init__(wargs, aargs, options)
        o = options
        self.folds = o.load_transform
        unused = [k for k, used in (("scale_path", o.load_transform),
                                    ("clip_path", o.weight_clip and o.clip_version == "v2"))
                  if k in o.model_fields_set and getattr(o, k) and not used]
        if unused:
            logger.info(f"TesseraQ: {'/'.join(unused)} unused (scale_path is read with load_transform: True, "
                        "clip_path with weight_clip: True and clip_version: v2), as in LLMC")
        if "reduce_memory" in o.model_fields_set:
            logger.info("TesseraQ: reduce_memory only bounds memory in LLMC (a trained block goes back to the "
                        "model's dtype); llmc always returns it to the model's dtype: ignored")

    @classmethod
    def check(cls, config) -> None:
        opts = TesseraQOptions.model_validate(config.quant.special)
        w = config.quant.weight
        key = "quant.special"
        if w is None:
            raise ConfigError("quant.weight", "TesseraQ learns the rounding of weights: a weight section is required")
        if isinstance(w.bit, str):
            raise ConfigError("quant.weight.bit", f"'{w.bit}': TesseraQ learns integer rounding; use an integer bit")
        if not w.round_zp:
            raise ConfigError("quant.weight.round_zp", "False: TesseraQ rounds w/s against an integer zero point; "
                              "remove round_zp")
        if opts.wd:
            raise ConfigError(f"{key}.wd", f"{opts.wd}: LLMC reads wd but never applies it (the rounding variables "
                              f"train without decay, the scale factors with a fixed {SCALE_WEIGHT_DECAY}); use 0")
        bad = [t for t in opts.thresholds if not 0 <= t <= 1]
        if bad:
            raise ConfigError(f"{key}.thresholds", f"{bad}: each threshold is the quantile of the rounding scores "
                              "left soft, in [0, 1]")
        if any(b > a for a, b in zip(opts.thresholds, opts.thresholds[1:])):
            raise ConfigError(f"{key}.thresholds", f"{opts.thresholds}: thresholds must not rise (each one hardens "
                              "more of the rounding; a larger one than before hardens nothing)")
        if opts.iterations > 0 and not opts.thresholds:
            raise ConfigError(f"{key}.thresholds", f"[] with iterations {opts.iterations}: training runs once per "
                              "threshold, so nothing would train; give thresholds or iterations: 0")
        if opts.scale_lr is not None and not opts.optimize_scale:
            raise ConfigError(f"{key}.scale_lr", f"{opts.scale_lr} with optimize_scale: False: no scale is trained")
        for k in ("clip_version", "clip_sym"):
            if k in opts.model_fields_set and not opts.weight_clip:
                raise ConfigError(f"{key}.{k}", f"{getattr(opts, k)} with weight_clip: False: no clips are used; "
                                  "set weight_clip: True or remove it")
        if opts.clip_sym is not None and opts.clip_version == "v2":
            raise ConfigError(f"{key}.clip_sym", f"{opts.clip_sym} with clip_version: v2: the clips are loaded "
                              "(AWQ's clip_sym chose them); clip_sym applies to v1's search")

    # ---- the block transform ----------------------------------------------------------------------
    def apply(self, job, targets):
        opts: TesseraQOptions = self.options
        aug = job.forward() if opts.aug_loss else None  # the float block on this block's own inputs
        if opts.load_transform:
            self._load_transform(job)
        if opts.weight_clip and opts.clip_version == "v1":
            self._clip_weights(job)
        qlinears = self.install_all(job)
        params = [p for p in job.block.parameters()]
        dtypes = [p.dtype for p in params]
        for p in params:  # trained in float32, as LLMC's block.float()
            p.requires_grad_(False)
            p.data = p.data.float()
        rounding = {name: self._rounding(job, name, q) for name, q in qlinears.items()}
        for name, q in qlinears.items():
            q.lwc = rounding[name]
        self.calibrate_static_acts(job, qlinears)  # from the inputs of the block at its float start
        self._train(job, targets, aug, list(rounding.values()))
        results = {name: r.on_grid(qlinears[name].weight.shape) for name, r in rounding.items()}
        for q in qlinears.values():
            q.lwc = None
        for p, dtype in zip(params, dtypes):
            p.data = p.data.to(dtype)
        flipped = []
        for name, q in qlinears.items():
            weight, scale, zero, changed = results[name]
            q.weight.data.copy_(weight.to(q.weight.dtype))
            q.set_weight_qparams(scale, zero)
            flipped.append(f"{name.rsplit('.', 1)[-1]} {100 * changed:.1f}%")
        logger.info(f"TesseraQ {job.name}: codes off round-to-nearest: {', '.join(flipped)}")
        return {}

    # ---- starting point: AWQ's scales and clips ---------------------------------------------------
    def _load_transform(self, job) -> None:
        """Fold the saved scales into the block (LLMC's tesseraq_load_transform on the original weights)."""
        scales = self.loaded["scales"]
        missing = []
        for subset in job.subsets:
            key = job.full_name(subset.layers[0])
            if key not in scales:
                missing.append(key)
                continue
            fold = fold_plan(job, subset)
            if fold is None:
                continue
            s = scales[key].float().to(job.module(subset.layers[0]).weight.device)
            fold.apply(fold.reduce(s, "max"))  # GQA: copies of one value per key/value channel, taken exactly
        if len(missing) == len(job.subsets):
            raise UserError(f"TesseraQ: the scale state has no entry for any subset of {job.name} (keys are full "
                            "module names such as model.layers.0.self_attn.q_proj)")
        if missing:
            logger.info(f"TesseraQ {job.name}: no saved scale for {', '.join(missing)}; left unscaled")

    def _clip_weights(self, job) -> None:
        """clip_version v1: AWQ's clip search on the (transformed) block, the weights clipped in place."""
        sym = self.wargs.symmetric if self.options.clip_sym is None else self.options.clip_sym
        feats = job.capture(sorted({s.input for s in job.subsets}))
        for subset in job.subsets:
            for name in job.quantized_layers(subset):
                if name in job.score_layers:  # q/k: AWQ (and LLMC's auto_clip) leave them unclipped
                    continue
                w = job.module(name).weight.data
                wargs = self.args_of(job, name)[0]  # the linear's own grid (mix_bits)
                lo, hi = clip_search(w, feats[subset.input], wargs, sym, token_index=job.inputs.token_index,
                                     reduce=job.ctx.reduce)
                clipped = torch.clamp(w.float().view(w.shape[0], lo.shape[1], -1), lo.unsqueeze(-1), hi.unsqueeze(-1))
                w.copy_(clipped.view_as(w).to(w.dtype))

    def _rounding(self, job, name: str, q) -> SoftRounding:
        """The grid (from AWQ's clips with v2, else the weight quantizer's min/max or mse range) and the
        soft rounding variables on it."""
        opts: TesseraQOptions = self.options
        wg = grouped(q.weight.detach().float(), q.wargs)
        clips = self.loaded.get("clips", {})
        full = job.full_name(name)
        if f"{full}.max" in clips:
            wmin, wmax = row_range(wg)
            lo, hi = clips[f"{full}.min"], clips[f"{full}.max"]
            if lo.numel() != wmin.numel():
                raise UserError(f"TesseraQ: the clips of {full} have {lo.numel()} groups, the weight quantizer "
                                f"makes {wmin.numel()} (the clips were found with another group size)")
            lo, hi = (c.reshape(wmin.shape).to(wmin) for c in (lo, hi))
            scale, zero = qparams_from_range(torch.maximum(lo, wmin), torch.minimum(hi, wmax), q.wargs)
        else:
            if clips and name not in job.score_layers:
                raise UserError(f"TesseraQ: the clip state has no entry for {full} (keys are full module names "
                                "such as model.layers.0.mlp.down_proj.max)")
            scale, zero = calibrate(wg, q.wargs)
        return SoftRounding(q.weight, scale, zero, q.wargs, opts.optimize_scale)

    # ---- training -------------------------------------------------------------------------------
    def _train(self, job, targets, aug, rounding: list[SoftRounding]) -> None:
        opts: TesseraQOptions = self.options
        ctx = job.ctx
        owned, n = sample_ids(job)
        gen = torch.Generator().manual_seed(ctx.seed + job.index)
        probe = [owned[i] for i in range(min(4, n)) if i in owned]  # LLMC logs the loss on 4 samples
        before = self._probe(job, targets, probe, hard=rounding)  # round-to-nearest on the grid
        params_r = [r.alpha for r in rounding]
        params_s = [r.factor for r in rounding if r.factor is not None]
        for t in opts.thresholds:
            for r in rounding:
                r.harden(t)
            if opts.iterations == 0:
                continue
            groups = [{"params": params_r, "lr": opts.lr}]
            if params_s:
                groups.append({"params": params_s, "lr": opts.scale_lr or opts.lr, "weight_decay": SCALE_WEIGHT_DECAY})
            optimizer = _adam(groups, opts.lr)  # a fresh one per threshold, as LLMC
            for p in params_r + params_s:
                p.requires_grad_(True)
            loss = None
            for _ in range(opts.iterations):
                picks = torch.randperm(n, generator=gen)[:opts.batch_size].tolist()
                loss = self._step(job, targets, aug, [owned[i] for i in picks if i in owned], params_r + params_s,
                                  optimizer)
            for p in params_r + params_s:
                p.requires_grad_(False)
                p.grad = None
            soft = sum(r.soft_fraction() * r.alpha.numel() for r in rounding) / sum(r.alpha.numel() for r in rounding)
            logger.debug(f"TesseraQ {job.name} threshold {t}: loss {loss:.6g}, {100 * (1 - soft):.1f}% hard")
        after = self._probe(job, targets, probe, hard=rounding)
        if before is not None:
            logger.info(f"TesseraQ {job.name}: reconstruction loss {before:.6g} before, {after:.6g} after")

    def _step(self, job, targets, aug, mine, params, optimizer) -> float:
        """One Adam step on the mean loss of the picked samples (summed over processes)."""
        ctx = job.ctx
        sse, tokens = self._sse(job, targets, aug, mine) if mine else (None, 0)
        optimizer.zero_grad(set_to_none=True)
        value = backward_mean(ctx, params, sse, tokens)
        finite = bool(torch.isfinite(value)) and all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                                     for p in params)
        if finite:
            optimizer.step()
        else:  # LLMC's GradScaler skips such steps
            logger.warning(f"TesseraQ {job.name}: non-finite loss or gradient; step skipped")
        return value.item()

    def _sse(self, job, targets, aug, picks) -> tuple[torch.Tensor, int]:
        """Squared error summed over the picked samples (LLMC's l2 before its mean over tokens; with aug_loss
        the mean of both targets' errors) and the number of tokens."""
        total, tokens = None, 0
        cast = nullcontext() if self.options.deactive_amp else job.ctx.autocast()
        for hidden, args, kwargs, rows in job.sample_batches(picks):
            with cast:
                out = job.block(hidden.float(), *args, **kwargs)
            out = (out[0] if isinstance(out, (tuple, list)) else out).float()
            err = None
            for ref in (targets, aug):
                if ref is None:
                    continue
                want = torch.cat([ref[b][r:r + 1] for b, r in rows]).to(out.device).float()
                e = (out - want).pow(2).sum()
                err = e if err is None else (err + e) / 2
            total = err if total is None else total + err
            tokens += out.numel() // out.shape[-1]
        return total, tokens

    @torch.no_grad()
    def _probe(self, job, targets, picks, hard: Optional[list[SoftRounding]] = None) -> Optional[float]:
        """The loss on a few samples (with every rounding hard when `hard` is given), for the log."""
        if not picks:
            return None
        saved = []
        if hard:
            for r in hard:
                saved.append(r.alpha.detach().clone())
                r.alpha.copy_(torch.where(r.alpha > 0, float("inf"), -float("inf")))
        sse, tokens = self._sse(job, targets, None, picks)
        for r, a in zip(hard or [], saved):
            r.alpha.copy_(a)
        return sse.item() / tokens
