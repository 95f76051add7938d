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

    def collect(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Call fn(name, input) for the named submodules over every calibration batch, cutting each block
        forward short once all of them have fired (what follows them is not needed)."""
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
        finally:
            for handle in handles:
                handle.remove()

    def capture(self, names: list[str]) -> dict[str, list[torch.Tensor]]:
        """Inputs of the named submodules for every calibration batch, from one block forward."""
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with self.hooks(names, lambda n, x, y: got[n].append(x.detach().to(self.ctx.activation_device))):
            self.forward()
        return got
