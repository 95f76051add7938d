"""`save_lightllm_kv_calib`: the static KV-cache ranges as LightLLM's FP8 KV-cache calibration file
(`save_path/<lightllm_kv_cache_name>`, LLMC's `kv_cache_calib.json`).

The layout is the one LLMC writes for LightLLM: version, architectures, quant_type (per_tensor or per_head),
qmin/qmax of FP8 e4m3 (∓448), num_layers, num_head (key/value heads), scales_shape [num_layers, width] and
scales: per layer the key scales then the value scales (width 2 per_tensor, 2·num_head per_head), each the
calibrated absmax divided by 448, so that x / scale fills the e4m3 range. LLMC takes that absmax from its
integer grid's ends (max |qmin − zero|, |qmax − zero| times the scale: 128/127 of the calibrated absmax for
its symmetric int8 grid); here it is the range the fake-quant model was calibrated to (for symmetric grids
half the grid's span times the scale, which is the calibrated absmax).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmc.quant.kvcache import STATIC, kv_args

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def _absmax(scale: torch.Tensor, zero: torch.Tensor, args) -> torch.Tensor:
    """The largest magnitude the grid (scale, zero) represents over the calibrated range."""
    if args.is_float or args.symmetric:
        half = args.qmax if args.is_float else (args.qmax - args.qmin) / 2
        return scale.float() * half
    return torch.maximum(((args.qmin - zero) * scale).abs(), ((args.qmax - zero) * scale).abs()).float()


def lightllm_kv_calib(model, adapter, cfg) -> dict:
    """The calibration record LightLLM reads, from the static ranges on the attention modules."""
    args = kv_args(cfg)
    hf = model.config
    num_head = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
    rows = []
    for i, m in enumerate(adapter.attention_modules()):
        if not hasattr(m, STATIC):
            raise RuntimeError(f"{adapter.block_name(i)}: no static KV-cache ranges were calibrated")
        ks, kz, vs, vz = getattr(m, STATIC)
        k, v = _absmax(ks, kz, args).reshape(-1), _absmax(vs, vz, args).reshape(-1)
        rows.append((torch.cat([k, v]) / FP8_MAX).cpu().tolist())
    width = 2 if cfg.granularity == "per_tensor" else 2 * num_head
    if any(len(r) != width for r in rows):
        raise RuntimeError(f"LightLLM expects {width} scales per layer ({cfg.granularity}, {num_head} heads)")
    arch = getattr(hf, "architectures", None)
    return {"version": "1.0", "architectures": arch[0] if arch else hf.model_type, "quant_type": cfg.granularity,
            "qmin": -FP8_MAX, "qmax": FP8_MAX, "num_layers": len(rows), "num_head": num_head,
            "scales_shape": [len(rows), width], "scales": rows}


def save_lightllm_kv_calib(model, adapter, cfg, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(lightllm_kv_calib(model, adapter, cfg), indent=4))
    tmp.replace(path)
