"""`eval.type: token_acc` (LLMC's TokenConsistencyEval): the share of positions at which the model's
next-token prediction (argmax) agrees with the float model's, over the same windows perplexity uses.

LLMC loads a second, float copy of the model to compare against; here the float model's predictions are
taken once before quantization starts (a [windows, seq_len] integer tensor), which is the same reference
without a second copy in memory."""
from __future__ import annotations

import torch
from tqdm import tqdm

from llmc.engine.pipeline import forward_per_block
from llmc.models.adapter import get_module

_CHUNK = 1024  # tokens per lm_head call


@torch.no_grad()
def predictions(model, adapter, windows: torch.Tensor, bs: int, ctx, per_block: bool, desc: str = "") -> torch.Tensor:
    """argmax next-token predictions [windows, seq_len] of the model as it stands."""
    batches = [windows[s:s + bs] for s in range(0, windows.shape[0], bs)]
    lm_head = get_module(model, adapter.lm_head)
    if per_block:
        hiddens = iter(forward_per_block(model, adapter, batches, ctx))
        ctx.onload(lm_head)
    else:
        model.to(ctx.device)
    out = []
    try:
        for ids in tqdm(batches, desc=desc or "token_acc", unit="batch", leave=False):
            if per_block:
                hidden = next(hiddens)
            else:
                with ctx.autocast():
                    hidden = get_module(model, adapter.backbone)(input_ids=ids.to(ctx.device), use_cache=False)[0]
            preds = [lm_head(hidden[:, s:s + _CHUNK]).float().argmax(-1) for s in range(0, hidden.shape[1], _CHUNK)]
            out.append(torch.cat(preds, 1).cpu())
    finally:
        if per_block:
            ctx.offload(lm_head)
        else:
            model.to(ctx.offload_device)
    return torch.cat(out)


def token_accuracy(preds: torch.Tensor, reference: torch.Tensor) -> float:
    return (preds == reference).float().mean().item()
