"""KV-cache fake quantization: the keys (after rotary embedding) and values that attention reads are
quantized as a quantized cache would store them: dynamically (Naive), with static ranges calibrated on the
calibration set (Naive, static: llmc/quant/kv_static.py), or as KIVI's cache (llmc/quant/kivi.py).

It hooks transformers' attention interface rather than a model family: the model is switched to a
registered attention function that quantizes key and value, then calls the implementation the model
had (sdpa or eager), so every family whose attention goes through that interface is covered.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from llmc.quant.kivi import kivi_attention
from llmc.quant.quantizer import QuantArgs, fake_quant, quant_dequant

ATTENTION = "llmc_kv_quant"
_ATTR = "_llmc_kv"  # set on each attention module while quantization is on: (QuantArgs, cfg, wrapped name)
STATIC = "_llmc_kv_static"  # calibrated (k_scale, k_zero, v_scale, v_zero) of an attention module
OBSERVER = "_llmc_kv_observer"  # set while static ranges are calibrated: called with (key, value)


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


def fake_quant_static(t: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """t [batch, kv_heads, tokens, head_dim] on fixed ranges: scale/zero [1] (per_tensor) or [1, heads, 1, 1]."""
    return quant_dequant(t.float(), scale.to(t.device), zero.to(t.device), args).to(t.dtype)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(module, _ATTR):
        raise RuntimeError(f"{type(module).__name__} is not among the adapter's attention modules")
    args, cfg, wrapped = getattr(module, _ATTR)
    observer = getattr(module, OBSERVER, None)
    if observer is not None:
        observer(key, value)
    elif args is not None and cfg.method == "Kivi":
        return kivi_attention(module, query, key, value, attention_mask, args,
                              cfg.group_size if cfg.granularity == "per_group" else None, cfg.window, **kwargs)
    elif args is not None and cfg.static:
        if not hasattr(module, STATIC):
            raise RuntimeError("static KV-cache quantization used before its ranges were calibrated")
        ks, kz, vs, vz = getattr(module, STATIC)
        key, value = fake_quant_static(key, args, ks, kz), fake_quant_static(value, args, vs, vz)
    elif args is not None:
        key, value = fake_quant_kv(key, args, cfg.granularity), fake_quant_kv(value, args, cfg.granularity)
    if wrapped == "eager":
        import importlib

        fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward")
    else:
        fn = ALL_ATTENTION_FUNCTIONS[wrapped]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register(wrapped: str) -> None:
    """Our attention function, and the attention mask the wrapped implementation takes (so causal, sliding
    window and padding masks reach it as they would reach the wrapped one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    if wrapped in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[wrapped])


def enable_kv_quant(model: nn.Module, attention_modules: list[nn.Module], cfg, observing: bool = False) -> str:
    """From now on attention reads fake-quantized keys and values (with `observing`, float keys and values,
    shown to each module's observer); returns the implementation it wraps."""
    wrapped = model.config._attn_implementation
    if wrapped == ATTENTION:  # already on (a reloaded model quantized again): keep what it wraps
        prev = getattr(attention_modules[0], _ATTR, None)
        wrapped = prev[2] if prev else "sdpa"
    _register(wrapped)
    args = kv_args(cfg)
    for m in attention_modules:
        setattr(m, _ATTR, (args, cfg, wrapped))
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
