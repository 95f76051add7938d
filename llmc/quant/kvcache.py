"""KV-cache fake quantization: the keys (after rotary embedding) and values that attention reads are
quantized dynamically, as a quantized cache would store them.

It hooks transformers' attention interface rather than a model family: the model is switched to a
registered attention function that quantizes key and value, then calls the implementation the model
had (sdpa or eager), so every family whose attention goes through that interface is covered.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from llmc.quant.quantizer import QuantArgs, fake_quant

ATTENTION = "llmc_kv_quant"
_ATTR = "_llmc_kv"  # set on each attention module while quantization is on: (QuantArgs, wrapped name)


def kv_args(cfg) -> Optional[QuantArgs]:
    if cfg is None:
        return None
    return QuantArgs(bit=cfg.bit, symmetric=cfg.symmetric, granularity="per_token")


def fake_quant_kv(t: torch.Tensor, args: QuantArgs, granularity: str) -> torch.Tensor:
    """t: [batch, kv_heads, tokens, head_dim]; per_token: one range per (batch, token) over all heads;
    per_head: one per (batch, head, token)."""
    if granularity == "per_head":
        return fake_quant(t, args)  # per_token grouping over the last dim = per head and token
    b, h, s, d = t.shape
    rows = t.transpose(1, 2).reshape(b, s, h * d)
    return fake_quant(rows, args).reshape(b, s, h, d).transpose(1, 2)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(module, _ATTR):
        raise RuntimeError(f"{type(module).__name__} is not among the adapter's attention modules")
    args, granularity, wrapped = getattr(module, _ATTR)
    if args is not None:
        key, value = fake_quant_kv(key, args, granularity), fake_quant_kv(value, args, granularity)
    if wrapped == "eager":
        import importlib

        fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward")
    else:
        fn = ALL_ATTENTION_FUNCTIONS[wrapped]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


def enable_kv_quant(model: nn.Module, attention_modules: list[nn.Module], cfg) -> str:
    """From now on attention reads fake-quantized keys and values; returns the implementation it wraps."""
    _register()
    wrapped = model.config._attn_implementation
    args = kv_args(cfg)
    for m in attention_modules:
        setattr(m, _ATTR, (args, cfg.granularity, wrapped))
    model.set_attn_implementation(ATTENTION)
    return wrapped


@contextmanager
def kv_quantized(model: nn.Module, attention_modules: list[nn.Module], cfg) -> Iterator[None]:
    """Within the context, attention reads fake-quantized keys and values (no-op when cfg is None)."""
    if cfg is None:
        yield
        return
    wrapped = enable_kv_quant(model, attention_modules, cfg)
    try:
        yield
    finally:
        model.set_attn_implementation(wrapped)
        for m in attention_modules:
            delattr(m, _ATTR)
