"""Guards against silent corruption: non-finite weights or activations where they enter, and folds that
change the float model.

A fold of scales (AWQ, SmoothQuant, OmniQuant's LET) is meant to leave the float block computing the same
function. `FloatCheck` keeps the float block's output on one calibration sample from before the algorithm
ran; after each fold the block (with quantization switched off) must reproduce it to float noise, or the
run stops naming the block and the subset. A family whose layout the adapter misdeclares (a norm that
scales by 1 + w, a post-LayerNorm block) is caught on the first block instead of yielding a wrong model.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from llmc.errors import UserError

# Relative output error allowed after a fold, by weight dtype: a fold rescales every weight of a subset,
# so half-precision weights round each product afresh (measured: ~1e-6 in float32, ~3e-3 in bfloat16).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class NonFiniteError(UserError):
    """A weight or activation holds NaN or Inf."""


class FoldMismatchError(UserError):
    """A transform meant to keep the float model changed it."""


def describe_non_finite(t: torch.Tensor) -> Optional[str]:
    """None when every element is finite, else how many NaN / Inf it holds."""
    if not t.is_floating_point() or t.is_meta or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} Inf among {t.numel()} values (shape {list(t.shape)})"


LOADED = "the checkpoint is damaged or was saved after an overflow. Nothing was quantized."


def check_module_finite(module: nn.Module, prefix: str, cause: str = LOADED, skip: str = "") -> None:
    """Every floating parameter and buffer of `module` finite, else stop naming the tensor (full name)."""
    for kind, named in (("weight", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            full = f"{prefix}.{name}" if prefix else name
            if skip and full.startswith(skip):
                continue
            found = describe_non_finite(t.detach())
            if found:
                raise NonFiniteError(f"the model's {kind} '{full}' holds {found}; {cause}")


def check_activations_finite(tensors: list[torch.Tensor], what: str) -> None:
    for b, t in enumerate(tensors):
        found = describe_non_finite(t)
        if found:
            raise NonFiniteError(f"{what} (calibration batch {b}) hold {found}. If the weights are finite, the "
                                 "forward overflowed: try model.compute_dtype float32 or bfloat16 instead of float16")


def _first_sample(value: Any, batch: int) -> Any:
    """The first sample of a captured call argument: tensors batched along dim 0 are sliced."""
    if isinstance(value, torch.Tensor):
        return value[:1] if batch > 1 and value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_sample(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _first_sample(v, batch) for k, v in value.items()}
    return value


class FloatCheck:
    """The float block's output on one calibration sample, recorded before any transform."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, device: torch.device,
                 block_name: str):
        batch = hidden.shape[0]
        self.hidden = hidden[:1].to(device)
        self.args, self.kwargs = _first_sample(args, batch), _first_sample(kwargs, batch)
        self.block_name = block_name
        self.reference = self._run(block)

    @torch.no_grad()
    def _run(self, block: nn.Module) -> torch.Tensor:
        from llmc.engine.block import block_output
        from llmc.quant.fake_linear import quant_disabled

        with quant_disabled(block):  # the block as its transformed float self
            out = block_output(block(self.hidden.to(_dtype_of(block)), *self.args, **self.kwargs))
        return out.float()

    def verify(self, block: nn.Module, where: str) -> None:
        """Stop when the block (quantization off) no longer computes its recorded float output."""
        out = self._run(block)
        dtype = _dtype_of(block)
        tol = _TOLERANCE.get(dtype, 1e-2)
        err = ((out - self.reference).norm() / self.reference.norm().clamp(min=1e-12)).item()
        if not err <= tol:  # NaN fails too
            raise FoldMismatchError(
                f"{self.block_name}: after folding {where}, the float block's output changed (relative error "
                f"{err:.3g} > {tol:g} allowed for {dtype} weights) on a calibration sample. The transform does "
                "not keep the float model for this architecture: the adapter declares an op that cannot absorb "
                "the scale exactly. Report it; skip the check with base.check_folds: False only to debug.")


def _dtype_of(block: nn.Module) -> torch.dtype:
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
