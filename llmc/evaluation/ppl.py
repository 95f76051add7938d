"""Perplexity the GPTQ way: the test text joined once, tokenized once, cut into non-overlapping
windows of seq_len tokens; PPL = exp(mean over windows of the mean next-token NLL)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmc.engine.pipeline import forward_per_block
from llmc.models.adapter import get_module

_LOGIT_CHUNK = 1024  # tokens per lm_head chunk: bounds memory at vocab x chunk floats


def eval_windows(tokenizer, text: str, seq_len: int, num_samples: Optional[int]) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    n = ids.numel() // seq_len
    if num_samples is not None:
        n = min(n, num_samples)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def _mean_nll(model, adapter, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL per window from the final hidden states, computing logits a chunk at a time."""
    hidden, labels = hidden[:, :-1], ids[:, 1:].to(hidden.device)
    total = torch.zeros(hidden.shape[0], device=hidden.device)
    for start in range(0, hidden.shape[1], _LOGIT_CHUNK):
        logits = adapter.logits(hidden[:, start:start + _LOGIT_CHUNK]).float()
        total += F.cross_entropy(logits.transpose(1, 2), labels[:, start:start + _LOGIT_CHUNK], reduction="none").sum(1)
    return total / labels.shape[1]


@torch.no_grad()
def perplexity(model, adapter, windows: torch.Tensor, bs: int, ctx, per_block: bool, desc: str = "ppl") -> float:
    batches = [windows[s:s + bs] for s in range(0, windows.shape[0], bs)]
    lm_head = get_module(model, adapter.lm_head)
    if per_block:  # all windows pass block i before block i+1 loads: one pass over the weights
        hiddens = iter(forward_per_block(model, adapter, batches, ctx))
        ctx.onload(lm_head)
    else:
        model.to(ctx.device)
    nlls = []
    try:
        for ids in tqdm(batches, desc=desc, unit="batch", leave=False):
            if per_block:
                hidden = next(hiddens)
            else:
                with ctx.autocast():
                    hidden = get_module(model, adapter.backbone)(input_ids=ids.to(ctx.device), use_cache=False)[0]
            nlls.append(_mean_nll(model, adapter, hidden, ids).cpu())
    finally:
        if per_block:
            ctx.offload(lm_head)
        else:
            model.to(ctx.offload_device)
    return math.exp(torch.cat(nlls).mean().item())
