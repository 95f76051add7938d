"""KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys are
quantized per channel over groups of G consecutive tokens, values per token over groups of G channels, and
the most recent tokens stay in float (the residual window of R tokens).

As KIVI's cache evolves while decoding, the query at position t reads
- key j quantized iff j < floor(t / R)·R (keys wait in float until R of them fill a chunk, which is then
  quantized at once, group by group of G tokens: those groups never change again);
- value j quantized iff j < t − R (the last R values before t, and t's own, are float; older ones were
  quantized one token at a time as they left the window).
Each quantized key group and value token depends on its own float values only, so the view of every query is
computed here from the float keys and values: a forward over a whole window gives each position what it
would read decoding token by token through KIVI's cache (ppl equals decode_ppl), and a decode step through
transformers' cache gives exactly what KIVI's quantized cache holds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from llmc.quant.quantizer import QuantArgs, fake_quant


def _quant(rows: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Each row of the last dimension on its own grid. Asymmetric as KIVI's code: 2^b levels from the row's
    min to its max (llmc's asymmetric grids widen the range to include 0, which KIVI's do not)."""
    if args.symmetric or args.is_float:
        return fake_quant(rows, args)
    x = rows.float()
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = 2 ** args.bit - 1
    scale = ((mx - mn) / levels).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.clamp(torch.round((x - mn) / scale), 0, levels) * scale + mn).to(rows.dtype)


def kivi_keys(key: torch.Tensor, args: QuantArgs, group: int) -> torch.Tensor:
    """key [b, h, T, d] with T a multiple of `group`: each channel quantized over each group of tokens."""
    b, h, t, d = key.shape
    rows = key.reshape(b, h, t // group, group, d).transpose(-1, -2)  # [..., d, group]: a row per channel
    return _quant(rows, args).transpose(-1, -2).reshape(b, h, t, d)


def kivi_values(value: torch.Tensor, args: QuantArgs, group: int) -> torch.Tensor:
    """value [b, h, T, d]: each token quantized over each group of `group` channels."""
    b, h, t, d = value.shape
    return _quant(value.reshape(b, h, t, d // group, group), args).reshape(b, h, t, d)


def kivi_masks(q_len: int, k_len: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_quantized, value_quantized) [q_len, k_len] booleans for the queries at the last q_len positions."""
    t = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j < (t // window) * window, j < t - window


def kivi_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], args: QuantArgs, group: Optional[int], window: int,
                   scaling: Optional[float] = None, softcap: Optional[float] = None,
                   position_ids: Optional[torch.Tensor] = None, **_) -> tuple[torch.Tensor, None]:
    """Eager attention in which every query reads KIVI's view of the cache (keys and values [b, h_kv, T, d],
    as transformers hands them to its attention functions). `group` None: G = R for keys, head_dim for values."""
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    if position_ids is not None and int(position_ids.max()) + 1 != k_len:
        raise RuntimeError(f"KIVI: this layer's cache holds {k_len} keys for {int(position_ids.max()) + 1} positions "
                           "(a sliding-window cache drops old tokens), so the key groups KIVI quantized before the "
                           "window moved cannot be rebuilt; KIVI needs caches that keep every token")
    mk, mv = kivi_masks(q_len, k_len, window, query.device)
    n = ((k_len - 1) // window) * window  # the keys any of these queries reads quantized
    kq = key.clone()
    if n:
        kq[:, :, :n] = kivi_keys(key[:, :, :n], args, group or window)
    vq = kivi_values(value, args, group or d)
    rep = hq // key.shape[1]
    k, kq, v, vq = (x.repeat_interleave(rep, dim=1) for x in (key, kq, value, vq))
    scaling = scaling if scaling is not None else 1 / math.sqrt(d)
    scores = torch.where(mk, query @ kq.transpose(2, 3), query @ k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        causal = torch.arange(k_len, device=query.device)[None, :] <= torch.arange(k_len - q_len, k_len,
                                                                                    device=query.device)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len]
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = (p * mv) @ vq + (p * ~mv) @ v
    return out.transpose(1, 2).contiguous(), None
