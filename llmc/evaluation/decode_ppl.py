"""`eval.type: decode_ppl` (LLMC's DecodePerplexityEval): perplexity of text decoded one token at a time
through the KV cache, so a quantized KV cache is measured as a deployed model reads it (each new token
attends to the keys and values the cache holds), not as a full-sequence forward sees them.

The texts are the dataset's rows (wikitext2: its lines), the first `num_samples` of them (LLMC's default
1); `num_eval_tokens` stops after that many predicted tokens in all. PPL = exp(mean NLL over every
predicted token)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from llmc.errors import ConfigError


def check_section(ev, prefix: str) -> None:
    if ev.name != ["wikitext2"]:
        raise ConfigError(f"{prefix}.name", f"{ev.name} with type decode_ppl; decode_ppl reads the rows of "
                          "wikitext2 (as LLMC does), so name: wikitext2")
    if ev.inference_per_block:
        raise ConfigError(f"{prefix}.inference_per_block", "True with type decode_ppl: decoding a token at a "
                          "time runs the whole model per token; set inference_per_block: False")


def decode_texts(rows: list[str], tokenizer, num_samples: Optional[int]) -> list[torch.Tensor]:
    """Token ids [1, L] of the first num_samples rows (1 when unset), tokenized as LLMC does."""
    return [tokenizer(row, return_tensors="pt").input_ids for row in rows[: num_samples or 1]]


@torch.no_grad()
def decode_perplexity(model, texts: list[torch.Tensor], ctx, num_eval_tokens: Optional[int] = None) -> tuple[float, int]:
    """(PPL, tokens predicted): each text fed one token per forward, the cache carrying the past."""
    from transformers import DynamicCache

    model.to(ctx.device)
    nlls = []
    try:
        for ids in texts:
            cache = DynamicCache()
            ids = ids.to(ctx.device)
            for i in range(ids.shape[1] - 1):
                with ctx.autocast():
                    logits = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits
                nlls.append(F.cross_entropy(logits[0, -1:].float(), ids[0, i + 1:i + 2]))
                if num_eval_tokens is not None and len(nlls) >= num_eval_tokens:
                    break
            if num_eval_tokens is not None and len(nlls) >= num_eval_tokens:
                break
    finally:
        model.to(ctx.offload_device)
    if not nlls:
        raise ValueError("the texts have no token to predict (each row needs at least two tokens)")
    return math.exp(torch.stack(nlls).mean().item()), len(nlls)
