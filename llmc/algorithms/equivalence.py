"""Equivalent transformations shared by AWQ, SmoothQuant and OmniQuant: a per-channel scale (and shift)
on a subset's input folded into the op in front of it, so the float block computes the same function,
and the subset output errors that searches over candidate scales minimise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from loguru import logger
from torch import nn


@dataclass
class Fold:
    """Divides prev_op's output channels by s (and subtracts z) and multiplies the subset's weight columns
    by s (adding W z to their biases), leaving the float block unchanged.

    When prev_op is a linear with fewer outputs than the subset has inputs (GQA v_proj → o_proj), s lives
    on prev_op's `reduced` channels and `expand` repeats it for the query heads that read each one. With
    `rows`, only those output rows of prev_op feed the subset (v's rows of a fused qkv_proj) and only they
    are divided. A norm computing x̂·(offset + w) takes w' = (offset + w)/s - offset."""

    prev: nn.Module
    linears: list[nn.Module]
    reduced: Optional[int]
    head_dim: Optional[int]
    can_shift: bool
    verify: Optional[Callable[[], None]] = None  # the fold guard: raises when the float block changed
    rows: Optional[tuple[int, int]] = None       # the row range of prev_op that feeds the subset
    offset: float = 0.0                          # a norm's unit offset (Gemma's 1 + w)
    readers: tuple[nn.Module, ...] = ()  # float modules reading prev_op's output too (MoE router): columns x s

    def check(self) -> None:
        """Stop unless the block still computes its float function (after `apply`, or after LET's
        parametrizations are registered)."""
        if self.verify is not None:
            self.verify()

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        if not self.reduced:
            return s
        channels = self.linears[0].in_features
        kv, hd = self.reduced // self.head_dim, self.head_dim
        return s.view(kv, 1, hd).expand(kv, channels // self.reduced, hd).reshape(-1)

    def reduce(self, stat: torch.Tensor, how: str) -> torch.Tensor:
        """A per-input-channel statistic brought onto the channels s lives on (mean or max over the
        query heads that share a key/value channel)."""
        if not self.reduced:
            return stat
        grouped = stat.view(self.reduced // self.head_dim, -1, self.head_dim)
        return (grouped.mean(1) if how == "mean" else grouped.amax(1)).reshape(-1)

    @torch.no_grad()
    def apply(self, s: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fold scale s (and shift z, on the same channels) in place; returns s over the subset's inputs."""
        full = self.expand(s)
        w, b = self.prev.weight.data, getattr(self.prev, "bias", None)
        b = None if b is None else b.data
        if self.rows is not None:
            w, b = w[self.rows[0]:self.rows[1]], None if b is None else b[self.rows[0]:self.rows[1]]
        if shift is not None:
            full_shift = self.expand(shift)
            for lin in (*self.linears, *self.readers):  # y = W x + b = W (x - z) + (b + W z)
                lin.bias.data.add_(lin.weight.data.float() @ full_shift.to(lin.weight.device).float())
            b.sub_(shift.to(b.dtype))
        if w.dim() == 1 and self.offset:
            w.copy_(((w.float() + self.offset) / s.to(w.device).float() - self.offset).to(w.dtype))
        elif w.dim() == 1:
            w.div_(s.to(w.dtype))
        else:
            w.div_(s.view(-1, 1).to(w.dtype))
        if b is not None:
            b.div_(s.to(b.dtype))
        for lin in (*self.linears, *self.readers):
            lin.weight.data.mul_(full.view(1, -1).to(lin.weight.device, lin.weight.dtype))
        self.check()
        return full


def fold_plan(job, subset, shift: bool = False) -> Optional[Fold]:
    """How to fold a scale over `subset`'s inputs into its prev_op and every linear of the subset (ignored
    ones too: they read the same input), or None (logged) when prev_op cannot absorb one. With shift,
    also require what a shift needs: a bias on prev_op and on every linear,
    and nothing non-linear in between (the adapter's `shiftable`)."""
    prev = job.module(subset.prev_op) if subset.prev_op else None
    linears = [job.module(n) for n in subset.layers]
    channels = linears[0].in_features
    where = f"{job.full_name(subset.layers[0])}: prev_op {subset.prev_op!r}"
    weight = getattr(prev, "weight", None)
    reduced = None
    if isinstance(prev, nn.Module) and hasattr(prev, "out_features"):
        rows = prev.out_features if subset.prev_rows is None else subset.prev_rows[1] - subset.prev_rows[0]
        if rows != channels:
            hd = job.head_dim
            if not (hd and channels % rows == 0 and rows % hd == 0):
                logger.info(f"{where} ({rows} outputs) cannot absorb a scale over {channels} inputs; skipped")
                return None
            reduced = rows
    elif not (isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == channels):
        logger.info(f"{where} cannot absorb a scale; skipped")
        return None
    readers = tuple(job.module(n) for n in subset.readers)
    can_shift = (subset.shiftable and getattr(prev, "bias", None) is not None
                 and all(getattr(lin, "bias", None) is not None for lin in (*linears, *readers)))
    if shift and not can_shift:
        logger.info(f"{where}: no bias to absorb a channel shift (or a non-linearity in between); scale only")
    subset_name = f"{subset.prev_op} -> {'/'.join(subset.layers)}"
    return Fold(prev, linears, reduced, job.head_dim, can_shift, lambda: job.check_float(subset_name),
                rows=subset.prev_rows, offset=subset.prev_offset, readers=readers)



def channel_ranges(job, inputs: list[str], feats: Optional[dict] = None) -> tuple[dict, dict]:
    """Per-channel min and max of the named linears' inputs over every batch (and process), from
    captured `feats` when given, else from a block forward cut short once they have all been seen."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        cur_lo, cur_hi = x.amin(0), x.amax(0)
        lo[name] = cur_lo if name not in lo else torch.minimum(lo[name], cur_lo)
        hi[name] = cur_hi if name not in hi else torch.maximum(hi[name], cur_hi)

    if feats is not None:
        for name, xs in feats.items():
            for x in xs:
                observe(name, x)
    else:
        job.collect(inputs, observe)
    return ({n: job.ctx.reduce(v, "min") for n, v in lo.items()},
            {n: job.ctx.reduce(v, "max") for n, v in hi.items()})


# ---- subset output errors ---------------------------------------------------------------------------
def forward_loss(job, subset, xs: list[torch.Tensor]) -> Callable[[Optional[torch.Tensor]], float]:
    """loss_of(divisor): mean squared error of the inspect module's output, on the inputs divided by
    `divisor` (a candidate scale) when given, against its float output now, summed over all batches
    (and processes) before dividing."""
    ctx = job.ctx
    with torch.no_grad(), ctx.autocast():
        float_out = [job.run_module(subset.inspect, x.to(ctx.device), b, subset.has_kwargs) for b, x in enumerate(xs)]

    def loss_of(divisor: Optional[torch.Tensor] = None) -> float:
        loss = torch.zeros((), device=ctx.device)
        count = 0
        with torch.no_grad(), ctx.autocast():
            for b, x in enumerate(xs):
                x = x.to(ctx.device)
                if divisor is not None:
                    x = x / divisor.to(x.dtype)
                out = job.run_module(subset.inspect, x, b, subset.has_kwargs)
                loss += nn.functional.mse_loss(out.float(), float_out[b].float(), reduction="sum")
                count += out.numel()
        return (ctx.reduce(loss) / ctx.reduce(torch.tensor(float(count), device=loss.device))).item()

    return loss_of


def gram_loss(ctx, linear, original: torch.Tensor, xs: list[torch.Tensor]) -> Callable[[], float]:
    """forward_loss for a subset whose inspect module is its one linear, without the forwards:
    sum ||x (W' - W)^T||^2 = tr(D G D^T) with D = W' - W and G = sum x^T x, so a candidate costs
    out x in^2 instead of tokens x out x in (6x less for SmolLM2's down_proj at 64k tokens)."""
    ci = original.shape[1]
    with torch.no_grad():
        gram = sum(x.reshape(-1, ci).float().t() @ x.reshape(-1, ci).float() for x in xs)
    gram = ctx.reduce(gram.to(ctx.device))
    tokens = ctx.reduce(torch.tensor(float(sum(x.numel() // ci for x in xs)), device=ctx.device))
    count = tokens * original.shape[0]
    reference = original.float().to(ctx.device)

    def loss_of() -> float:
        d = linear.weight.data.float() - reference
        return ((d @ gram) * d).sum().div(count).item()

    return loss_of
