"""Mixture-of-experts blocks with one nn.Linear per expert matrix.

transformers 5 stores a block's experts as two fused 3-D parameters (`gate_up_proj` [E, 2I, H] with the
gate rows first, `down_proj` [E, H, I]) and no linear per expert, so nothing could hook, scale or
quantize one expert. At load, `unfuse_experts` replaces each such module by `Experts`: a ModuleList of
`Expert`s (names `mlp.experts.3.gate_proj`, the per-expert layout transformers itself saves and the
hub and vLLM use) whose forward takes the router's choice exactly as the fused eager forward does.

While a quantization pass collects statistics (`calibrating`), every expert can see every token
(`all_experts`, llm-compressor's calibrate_all_experts) while the block's output still follows the
router; the routed tokens per expert are counted either way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Iterator, Optional

import torch
from loguru import logger
from torch import nn

from llmc.errors import UserError
from llmc.models.adapter import Adapter, Subset, get_module

GATE_UP = "gate_up_proj"


class Expert(nn.Module):
    """One gated MLP: down(act(gate(x)) * up(x)); the linears carry the names the adapter declares."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, names: tuple[str, str, str],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device))
        setattr(self, up, nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device))
        setattr(self, down, nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The experts of one MoE block, called as the fused module is: (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) → [T, H]."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.all_experts: Optional[bool] = None  # set while calibrating: True runs every expert on every token
        self.routed = torch.zeros(self.num_experts, dtype=torch.long)  # routed tokens per expert, while calibrating

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, T]
        if self.all_experts is not None:
            self.routed += mask.sum(dim=(1, 2)).cpu()
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            if self.all_experts:
                # statistics see every token; the output keeps only the tokens the router sent here
                y = expert(hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_fused(module: nn.Module) -> bool:
    w = getattr(module, GATE_UP, None)
    return isinstance(w, torch.Tensor) and w.dim() == 3


def unfused(fused: nn.Module, names: tuple[str, str, str]) -> Experts:
    """An `Experts` computing what the fused module computes, with its weights (meta stays meta)."""
    layout = {k: getattr(fused, k, d) for k, d in (("is_concatenated", True), ("is_transposed", False),
                                                     ("has_bias", False), ("has_gate", True))}
    if layout != {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True}:
        raise UserError(f"{type(fused).__name__}: fused expert layout {layout} is not the [gate; up] x hidden "
                        "layout without biases that llmc unfuses")
    gate_up, down = getattr(fused, GATE_UP), fused.down_proj
    n, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if tuple(down.shape) != (n, hidden, inter):
        raise UserError(f"{type(fused).__name__}: down_proj {tuple(down.shape)} does not match gate_up_proj "
                        f"{tuple(gate_up.shape)}")
    experts = []
    for e in range(n):
        ex = Expert(hidden, inter, fused.act_fn, names, gate_up.dtype, gate_up.device)
        if not gate_up.is_meta:
            with torch.no_grad():
                getattr(ex, names[0]).weight.copy_(gate_up[e, :inter])
                getattr(ex, names[1]).weight.copy_(gate_up[e, inter:])
                getattr(ex, names[2]).weight.copy_(down[e])
        experts.append(ex)
    return Experts(experts)


def unfuse_experts(blocks: nn.ModuleList, path: str, names: tuple[str, str, str]) -> int:
    """Replace the fused experts module at `path` (relative to each block) by `Experts`; returns how many
    blocks had one (dense blocks of a MoE model have none)."""
    count = 0
    parent_path, _, leaf = path.rpartition(".")
    for block in blocks:
        try:
            parent = block.get_submodule(parent_path) if parent_path else block
        except AttributeError:
            continue
        module = getattr(parent, leaf, None)
        if module is not None and _is_fused(module):
            setattr(parent, leaf, unfused(module, names))
            count += 1
    return count


def experts_modules(root: nn.Module) -> list[Experts]:
    return [m for m in root.modules() if isinstance(m, Experts)]


@contextmanager
def calibrating(root: nn.Module, all_experts: bool) -> Iterator[None]:
    """Within: every `Experts` under root counts routed tokens and (all_experts) runs every expert on
    every token, for the statistics hooks see; outside, the plain routed forward."""
    modules = experts_modules(root)
    for m in modules:
        m.all_experts = all_experts
        m.routed.zero_()
    try:
        yield
    finally:
        for m in modules:
            m.all_experts = None


def _find(block: nn.Module, name: Optional[str]) -> Optional[nn.Module]:
    if name is None:
        return None
    try:
        return get_module(block, name)
    except AttributeError:
        return None


class MoeAdapter(Adapter):
    """A decoder whose MLP is, in some or all blocks, routed experts (plus optional shared experts).

    Subsets per block: the attention ones; then either the dense MLP's, or
    - one subset of every expert's gate and up linears and the shared expert's, behind
      post_attention_layernorm: they all read its output, and a fold can put only one scale on it; each
      linear's statistics come from its own input (`layer_inputs`: an expert's routed tokens), and the
      router and shared-expert gate are `readers` that stay float and are compensated by every fold;
    - per expert (and shared expert) its down linear, behind its own up linear."""

    attention_subsets: ClassVar[list[Subset]]
    dense_subsets: ClassVar[list[Subset]]
    mlp: ClassVar[str] = "mlp"
    experts: ClassVar[Optional[str]] = "mlp.experts"
    router: ClassVar[str] = "mlp.gate"
    shared: ClassVar[Optional[str]] = None        # shared expert MLP (gate_proj, up_proj, down_proj)
    shared_gate: ClassVar[Optional[str]] = None   # its sigmoid gate, a linear reading the same input

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.prepare(model)
        self._per_block = [self._subsets_of(block) for block in self.block_list()]
        self.subsets = self._per_block[0] if self._per_block else list(self.attention_subsets)

    def block_subsets(self, index: int) -> list[Subset]:
        return self._per_block[index]

    def mlp_outs(self, index: int) -> list[str]:
        block = self.block_list()[index]
        experts = _find(block, self.experts)
        if not isinstance(experts, Experts):
            return super().mlp_outs(index)
        shared = [f"{self.shared}.down_proj"] if _find(block, self.shared) is not None else []
        return [f"{self.experts}.{e}.{self.expert_linears[2]}" for e in range(len(experts))] + shared

    def _subsets_of(self, block: nn.Module) -> list[Subset]:
        experts = _find(block, self.experts)
        if not isinstance(experts, Experts):
            return [*self.attention_subsets, *self.dense_subsets]
        gate, up, down = self.expert_linears
        layers, inputs = [], []
        for e in range(len(experts)):
            first = f"{self.experts}.{e}.{gate}"
            layers += [first, f"{self.experts}.{e}.{up}"]
            inputs += [first, first]
        shared = self.shared if _find(block, self.shared) is not None else None
        if shared:
            layers += [f"{shared}.gate_proj", f"{shared}.up_proj"]
            inputs += [f"{shared}.gate_proj"] * 2
        readers = tuple(n for n in (self.router, self.shared_gate) if _find(block, n) is not None)
        subsets = [*self.attention_subsets,
                   Subset(layers=tuple(layers), prev_op="post_attention_layernorm", input=self.mlp,
                          inspect=self.mlp, readers=readers, layer_inputs=tuple(inputs))]
        for k, (prefix, (g, u, d)) in enumerate(
                [(f"{self.experts}.{e}", (gate, up, down)) for e in range(len(experts))] + (
                    [(shared, ("gate_proj", "up_proj", "down_proj"))] if shared else [])):
            subsets.append(Subset(layers=(f"{prefix}.{d}",), prev_op=f"{prefix}.{u}", input=f"{prefix}.{d}",
                                  inspect=f"{prefix}.{d}", beside_previous=k > 0))
        return subsets


def report_routing(block: nn.Module, block_name: str, all_experts: bool) -> None:
    """Log the routed tokens per expert of one block (counted since the last report); with routed-only
    calibration an expert that got no token would be quantized without statistics: stop, naming it."""
    for name, m in ((n, m) for n, m in block.named_modules() if isinstance(m, Experts)):
        counts = m.routed.tolist()
        m.routed.zero_()
        logger.info(f"{block_name}.{name}: routed tokens per expert {counts}"
                    + (" (every expert calibrated on every token)" if all_experts else ""))
        idle = [e for e, c in enumerate(counts) if c == 0]
        if idle and not all_experts:
            raise UserError(f"{block_name}.{name}: experts {idle} received no calibration token with "
                            "calib.calibrate_all_experts: False, so their statistics are empty; set "
                            "calibrate_all_experts: True (every expert sees every token) or give more calibration data")
