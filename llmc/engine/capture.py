"""Inputs of the decoder blocks: the first block's hidden states plus the keyword arguments the model
passes to each block (attention masks, position ids, rotary embeddings), captured without running any
block: every block is swapped for a recorder that returns its input unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from llmc.models.adapter import Adapter, get_module, set_module

# A cache object replayed across calibration batches lets one batch attend to another's keys.
_DROPPED = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


@dataclass
class BlockInputs:
    """Per calibration batch: hidden states entering the current block, and each block's call arguments."""

    hidden: list[torch.Tensor]
    args: list[list[tuple]] = field(default_factory=list)          # [block][batch] extra positionals
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [block][batch]
    token_index: Optional[list[torch.Tensor]] = None  # data-parallel: global index of each local token, by batch

    def call(self, block_index: int, batch: int) -> tuple[tuple, dict]:
        return self.args[block_index][batch], self.kwargs[block_index][batch]

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module, index: int, sink: BlockInputs):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: the block's weights stay where they are
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        self.sink.args[self.index].append(args)
        self.sink.kwargs[self.index].append(kwargs)
        if self.index == 0:
            self.sink.hidden.append(hidden_states)
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)  # models read per-layer attributes (attention_type)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], ctx) -> BlockInputs:
    blocks = adapter.block_list()
    sink = BlockInputs(hidden=[], args=[[] for _ in blocks], kwargs=[[] for _ in blocks])
    outer = adapter.present(adapter.embeddings + adapter.final)
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, sink)
    for name in outer:
        set_module(model, name, ctx.onload(get_module(model, name)))
    try:
        backbone = get_module(model, adapter.backbone)
        for ids in batches:
            backbone(input_ids=ids.to(ctx.device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for name in outer:
            set_module(model, name, ctx.offload(get_module(model, name)))
    sink.hidden = [h.to(ctx.activation_device) for h in sink.hidden]
    return sink
