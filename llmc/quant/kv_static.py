"""Static KV-cache ranges (LLMC's static Naive KV quantization) and the config checks of quant.kvcache.

Calibration, as LLMC's static_minmax: for every calibration sample, the min and max of each layer's keys
(after rotary embedding) and values, over the whole tensor (per_tensor) or per key/value head (per_head);
averaged over the samples; the grid's scale and zero from that range. The keys and values are those of the
model as it is evaluated and saved (weights and activations fake-quantized), read through the attention
hook of llmc/quant/kvcache.py. Sums over samples, so the same result under data parallel.
"""
from __future__ import annotations

import torch
from loguru import logger

from llmc.errors import ConfigError
from llmc.quant.kvcache import OBSERVER, STATIC, enable_kv_quant, kv_args
from llmc.quant.quantizer import qparams_from_range


def check_kv(config) -> None:
    """Before anything loads: what the kvcache section needs from the other sections."""
    for stage in config.stage_configs():
        kv = stage.quant.kvcache
        if kv is not None and kv.static and stage.calib is None:
            raise ConfigError("quant.kvcache.static", "True: static KV ranges are calibrated on the calibration set; "
                              "add a calib section")
    if config.save.save_lightllm_kv_calib:
        kv = config.stage_configs()[-1].quant.kvcache
        if kv is None or not kv.static:
            raise ConfigError("save.save_lightllm_kv_calib", "True needs static KV-cache ranges (quant.kvcache with "
                              "static: True, or act.static: True as LLMC's configs write it), granularity "
                              "per_tensor or per_head: LightLLM reads one scale per layer or per head")


def check_kv_model(config, adapter) -> None:
    """Against the model's shapes (meta device): head counts and KIVI's groups."""
    kv = config.quant.kvcache
    if kv is None:
        return
    cfg = adapter.model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    if kv.head_num is not None and kv.head_num != kv_heads:
        raise ConfigError("quant.kvcache.head_num", f"{kv.head_num}, but the model has {kv_heads} key/value heads "
                          f"(num_key_value_heads); set head_num: {kv_heads}")
    decoding = [ev.type for ev in config.eval if ev.type in ("decode_ppl", "generate_only")]
    if kv.method == "Kivi" and decoding and "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise ConfigError("quant.kvcache.method", f"Kivi with eval type {decoding[0]} on {cfg.model_type}, whose "
                          "sliding-window layers keep only the last tokens in the cache: the key groups KIVI "
                          "quantized before the window moved cannot be rebuilt; evaluate with type ppl (every "
                          "position reads KIVI's view of the whole window) or use method Naive")
    head_dim = adapter.head_dim()
    if kv.method == "Kivi" and kv.granularity == "per_group" and head_dim and head_dim % kv.group_size:
        raise ConfigError("quant.kvcache.group_size", f"{kv.group_size} does not divide the head dimension {head_dim}: "
                          "KIVI groups each value token's channels")


@torch.no_grad()
def calibrate_kv(model, adapter, batches: list, ctx, cfg) -> None:
    """Fix the static KV ranges of every attention module from the calibration batches."""
    from llmc.engine.pipeline import forward_per_block

    if not batches:
        raise RuntimeError("static KV-cache ranges need calibration batches")
    modules = adapter.attention_modules()
    per_head = cfg.granularity == "per_head"
    stats: list[dict[str, torch.Tensor]] = [{} for _ in modules]

    def observer(i: int):
        def observe(key: torch.Tensor, value: torch.Tensor) -> None:
            dims = (2, 3) if per_head else (1, 2, 3)  # each sample's range: per head, or over the whole tensor
            new = {}
            for name, t in (("k", key), ("v", value)):
                t = t.detach().float()
                new[f"{name}min"], new[f"{name}max"] = t.amin(dim=dims).sum(0), t.amax(dim=dims).sum(0)
            new["n"] = torch.tensor(float(key.shape[0]), device=key.device)
            for k, v in new.items():
                stats[i][k] = stats[i][k] + v if k in stats[i] else v
        return observe

    wrapped = enable_kv_quant(model, modules, cfg)
    for i, m in enumerate(modules):
        setattr(m, OBSERVER, observer(i))
    try:
        forward_per_block(model, adapter, batches, ctx)
    finally:
        for m in modules:
            delattr(m, OBSERVER)
        model.set_attn_implementation(wrapped)
    args = kv_args(cfg)
    for m, s in zip(modules, stats):
        s = {k: ctx.reduce(v, "sum") for k, v in s.items()}
        shape = (1, -1, 1, 1) if per_head else (1,)
        qp = [qparams_from_range(s[f"{x}min"] / s["n"], s[f"{x}max"] / s["n"], args) for x in ("k", "v")]
        setattr(m, STATIC, tuple(t.reshape(shape) for pair in qp for t in pair))
    logger.info(f"static KV-cache ranges calibrated ({cfg.granularity}) on {int(s['n'].item())} samples")


def static_tensors(adapter) -> dict[str, torch.Tensor]:
    """{attention module name}.{k,v}_{scale,zero} of the calibrated static ranges ({} when none)."""
    out = {}
    for i, m in enumerate(adapter.attention_modules()):
        if hasattr(m, STATIC):
            name = f"{adapter.block_name(i)}.{adapter.attention}"
            for key, t in zip(("k_scale", "k_zero", "v_scale", "v_zero"), getattr(m, STATIC)):
                out[f"{name}.{key}"] = t.detach().contiguous().cpu()
    return out


def install_static(adapter, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved static ranges (`static_tensors`) back on the attention modules."""
    for i, m in enumerate(adapter.attention_modules()):
        name = f"{adapter.block_name(i)}.{adapter.attention}"
        setattr(m, STATIC, tuple(tensors[f"{name}.{key}"] for key in ("k_scale", "k_zero", "v_scale", "v_zero")))
