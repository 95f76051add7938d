"""One decoder block during quantization: its module, subsets, captured inputs, and the forwards and
hooks an algorithm needs. Algorithms see only this object."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from llmc.engine.capture import BlockInputs
from llmc.engine.guard import FloatCheck
from llmc.models.adapter import Subset, get_module


class _Enough(Exception):
    """Raised by a collection hook to end a block forward early; caught only in BlockJob.collect."""


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _merge(values: list, rows: list[tuple[int, int]], sizes: list[int]):
    """One call argument for samples gathered from several batches (see BlockJob.sample_batches)."""
    first = values[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([v[i] for v in values], rows, sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _merge([v[k] for v in values], rows, sizes) for k in first}
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        return first
    picked = [v[r:r + 1] if v.shape[0] == n and n > 1 else v for v, (_, r), n in zip(values, rows, sizes)]
    if picked[0].shape[0] == 1 and all(p is picked[0] or torch.equal(p, picked[0]) for p in picked[1:]):
        return picked[0]
    return torch.cat(picked)


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockJob:
    index: int
    name: str                      # full module name, e.g. "model.layers.3"
    block: nn.Module
    subsets: list[Subset]
    inputs: Optional[BlockInputs]  # None for data-free runs
    ignored: set[str]              # full names of linears that stay float
    ctx: object
    head_dim: Optional[int] = None           # attention head size (to share scales across GQA query heads)
    score_layers: tuple[str, ...] = ()       # linears whose outputs form attention scores
    float_check: Optional[FloatCheck] = None  # the float block's output before any transform (fold guard)
    n_blocks: Optional[int] = None            # decoder blocks in the model (NormTweaking's lr schedule)

    # ---- structure -------------------------------------------------------------------------------
    def full_name(self, name: str) -> str:
        return f"{self.name}.{name}"

    def module(self, name: str) -> nn.Module:
        return get_module(self.block, name)

    def quantized_layers(self, subset: Optional[Subset] = None) -> list[str]:
        names = subset.layers if subset else [n for s in self.subsets for n in s.layers]
        return [n for n in names if self.full_name(n) not in self.ignored]

    def check_float(self, where: str) -> None:
        """Stop unless the block, quantization off, still computes what it computed before any fold."""
        if self.float_check is not None:
            self.float_check.verify(self.block, where)

    # ---- forwards --------------------------------------------------------------------------------
    @property
    def n_batches(self) -> int:
        return len(self.inputs.hidden) if self.inputs else 0

    @torch.no_grad()
    def forward(self, hidden: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """Block outputs for every calibration batch (on the activation device)."""
        hidden = self.inputs.hidden if hidden is None else hidden
        outs = []
        with self.ctx.autocast():
            for b, h in enumerate(hidden):
                args, kwargs = self.inputs.call(self.index, b)
                out = block_output(self.block(h.to(self.ctx.device), *args, **kwargs))
                outs.append(out.to(self.ctx.activation_device, h.dtype))
        return outs

    def samples(self) -> list[tuple[int, int]]:
        """(batch, row) of every calibration sample this process holds."""
        return [(b, r) for b, h in enumerate(self.inputs.hidden) for r in range(h.shape[0])]

    def sample_batches(self, picks: list[tuple[int, int]]) -> Iterator[tuple]:
        """Mini-batches made of arbitrary calibration samples: (hidden, args, kwargs, rows) on the device,
        one per sequence length among the picks. Keyword tensors shared by a whole batch (rotary tables,
        a causal mask of batch size 1) are passed once when every pick has the same; per-sample ones
        (padding masks) are cut and concatenated."""
        by_shape: dict[tuple, list[tuple[int, int]]] = {}
        for b, r in picks:
            by_shape.setdefault(tuple(self.inputs.hidden[b].shape[1:]), []).append((b, r))
        for rows in by_shape.values():
            hidden = torch.cat([self.inputs.hidden[b][r:r + 1] for b, r in rows]).to(self.ctx.device)
            calls = [self.inputs.call(self.index, b) for b, _ in rows]
            sizes = [self.inputs.hidden[b].shape[0] for b, _ in rows]
            args = tuple(_merge([c[0][i] for c in calls], rows, sizes) for i in range(len(calls[0][0])))
            kwargs = {k: _merge([c[1][k] for c in calls], rows, sizes) for k in calls[0][1]}
            yield hidden, _to(args, self.ctx.device), _to(kwargs, self.ctx.device), rows

    def run_module(self, name: str, x: torch.Tensor, batch: int, kwargs_needed: bool) -> torch.Tensor:
        """Run one submodule (a subset's `inspect`) on x, with the block's kwargs where it takes them."""
        module = self.module(name)
        if not kwargs_needed:
            return block_output(module(x))
        args, kwargs = self.inputs.call(self.index, batch)
        return block_output(module(x, *args, **kwargs) if name else module(x, **kwargs))

    @contextmanager
    def hooks(self, names: list[str], fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        """Call fn(name, input, output) on each forward of the named submodules."""
        handles = [
            self.module(n).register_forward_hook(lambda m, inp, out, n=n: fn(n, inp[0], block_output(out)))
            for n in names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def collect(self, names: list[str], fn: Callable[[str, torch.Tensor], None],
                end_batch: Optional[Callable[[], None]] = None) -> None:
        """Call fn(name, input) for the named submodules over every calibration batch, cutting each block
        forward short once all of them have fired (what follows them is not needed); end_batch() after
        each batch."""
        seen: set[str] = set()

        def pre_hook(name: str, x: torch.Tensor) -> None:
            fn(name, x.detach())
            seen.add(name)
            if len(seen) == len(names):
                raise _Enough

        handles = [self.module(n).register_forward_pre_hook(lambda m, inp, n=n: pre_hook(n, inp[0])) for n in names]
        try:
            with torch.no_grad(), self.ctx.autocast():
                for b, h in enumerate(self.inputs.hidden):
                    seen.clear()
                    args, kwargs = self.inputs.call(self.index, b)
                    try:
                        self.block(h.to(self.ctx.device), *args, **kwargs)
                    except _Enough:
                        pass
                    if end_batch is not None:
                        end_batch()
        finally:
            for handle in handles:
                handle.remove()

    def capture(self, names: list[str]) -> dict[str, list[torch.Tensor]]:
        """Inputs of the named submodules for every calibration batch, from one block forward."""
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with self.hooks(names, lambda n, x, y: got[n].append(x.detach().to(self.ctx.activation_device))):
            self.forward()
        return got
