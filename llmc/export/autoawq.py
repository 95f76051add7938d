"""AutoAWQ checkpoints (`save_autoawq`, folder `autoawq_quant_model/`): 4-bit weights with a zero point per
group, in AutoAWQ's GEMM layout, which transformers (AwqConfig), vLLM and SGLang load.

Per quantized linear (in = in_features, out = out_features, g = group_size):
  qweight  int32 [in, out/8]    unsigned codes of W^T; word k of a row holds columns 8k..8k+7, nibble i
                                 (bits 4i..4i+3) holding column 8k + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  qzeros   int32 [in/g, out/8]  unsigned zero points, packed the same way
  scales   fp16  [in/g, out]
and W[o, j] = (code - zero) * scale of group j // g. llmc's signed grid maps by adding 8 to codes and zero
points; symmetric weights are stored with zero point 8, which is the same grid.

Refused (before writing): bits other than 4, float formats, per-channel/per-tensor weights (AWQ's config
holds one group_size for every layer), activation or KV-cache quantization, GPTQ act order with moving
groups (no g_idx in this format; use static_groups), and layers whose out_features is not a multiple of 8.
"""
from __future__ import annotations

from typing import Optional

import torch

from llmc.export.packing import (PackedFormat, Spec, common_checks, float_linears, group_table, pack_int32,
                                 refuse, register, write_packed)
from llmc.quant.fake_linear import quant_linears

FORMAT = "AutoAWQ (GEMM)"
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def check(spec: Spec, key: str = "save.save_autoawq") -> None:
    w = common_checks(spec, key, FORMAT)
    if w.is_float or w.bit != 4:
        refuse(key, FORMAT, f"quant.weight.bit={w.bit}", "its GEMM kernels take 4-bit integer weights only "
               "(save_gptq stores 2/3/4/8 bits, save_vllm any integer width and fp8)")
    if w.granularity != "per_group":
        refuse(key, FORMAT, f"quant.weight.granularity={w.granularity}", "it stores one group_size for all "
               "layers (use per_group, e.g. group_size: 128; save_gptq writes per-channel as group_size -1)")
    if spec.g_idx:
        refuse(key, FORMAT, "GPTQ actorder without static_groups", "it has no g_idx, so every group must be a "
               "contiguous run of input columns (set quant.special.static_groups: True, or use save_gptq)")


def interleave(packed_dim_last: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension so that dense nibble packing yields AutoAWQ's word order."""
    n = packed_dim_last.shape[-1]
    perm = (torch.arange(0, n, 8).unsqueeze(1) + torch.tensor(ORDER)).reshape(-1)
    return packed_dim_last[..., perm]


def pack_layer(q) -> dict[str, torch.Tensor]:
    codes, scale, zero, _ = group_table(q)
    codes_u = (codes + 8).to(torch.int32)       # signed [-8, 7] → unsigned [0, 15]
    zero_u = (zero + 8).to(torch.int32)
    return {
        "qweight": pack_int32(interleave(codes_u.t()), 4, dim=1),
        "qzeros": pack_int32(interleave(zero_u.t()), 4, dim=1),
        "scales": scale.t().to(torch.float16),
    }


def save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_autoawq") -> None:
    layers = list(quant_linears(model))
    group_sizes = set()
    for name, q in layers:
        check(Spec.of(q), key)
        if q.out_features % 8:
            refuse(key, FORMAT, f"{name} (out_features {q.out_features})", "8 output columns share an int32 word")
        group_sizes.add(q.wargs.group_size)
    if not layers:
        refuse(key, FORMAT, "a model without quantized linears", "nothing to pack")
    if len(group_sizes) > 1:
        refuse(key, FORMAT, f"group sizes {sorted(group_sizes)}", "its config holds one group_size")
    tensors = {name: pack_layer(q) for name, q in layers}
    config = {"quant_method": "awq", "bits": 4, "group_size": group_sizes.pop(), "zero_point": True,
              "version": "gemm", "modules_to_not_convert": float_linears(model)}
    write_packed(model, tokenizer, path, tensors, config, recipe, "autoawq-gemm")


AUTOAWQ = register(PackedFormat("save_autoawq", "autoawq_quant_model", check, save, scale_dtype="float16"))
# MLC-LLM converts AutoAWQ GEMM weights (`mlc_llm convert_weight --quantization q4f16_autoawq --source-format awq
# --source mlcllm_quant_model/model.safetensors`), so LLMC's save_mlcllm writes this same folder under its own name.
MLCLLM = register(PackedFormat("save_mlcllm", "mlcllm_quant_model", check, save, scale_dtype="float16"))
