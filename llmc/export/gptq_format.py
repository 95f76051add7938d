"""GPTQ checkpoints (`save_gptq`, folder `gptq_quant_model/`): `checkpoint_format: gptq` (v1) for symmetric
weights, `gptq_v2` for asymmetric ones, as GPTQModel, transformers (through GPTQModel) and vLLM load them.

Per quantized linear (in, out, b = bits, G groups, runs of R = 32/gcd(b, 32) values fill whole words):
  qweight  int32 [in*b/32, out]   unsigned codes packed along the input dimension, little-endian: input row
                                   j of a run sits at bits b*j.. of the run's words (3-bit values straddle)
  qzeros   int32 [G, out*b/32]    unsigned zero points packed the same way along outputs: v1 stores zero - 1
                                   (the historical off-by-one its loaders add back), v2 the zero point itself
  scales   fp16  [G, out]
  g_idx    int32 [in]             group of each input column (a permutation of groups with act order)
and W[o, j] = (code - zero) * scale, group g_idx[j]. llmc's signed grid maps by adding 2^(b-1); symmetric
weights have zero point 2^(b-1) (v1 stores 2^(b-1) - 1). Asymmetric weights are written as v2 because
GPTQModel refuses asymmetric v1 checkpoints it did not make itself, and v1 cannot store an unsigned zero
point of 0 (it would be written as -1).

Per-channel weights are written as group_size -1 (one group); per-tensor as one group whose scale repeats.
Refused: bits other than 2/3/4/8, float formats, activation or KV-cache quantization, shapes that do not
fill whole words. desc_act is true exactly when act order moved the groups (GPTQ without static_groups).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from llmc.export.packing import (PackedFormat, Spec, common_checks, float_linears, group_table, pack_int32,
                                 refuse, register, run_length, split_block_name, write_packed)
from llmc.quant.fake_linear import quant_linears

FORMAT = "GPTQ"
BITS = (2, 3, 4, 8)


def check(spec: Spec, key: str = "save.save_gptq") -> None:
    w = common_checks(spec, key, FORMAT)
    if w.is_float or w.bit not in BITS:
        refuse(key, FORMAT, f"quant.weight.bit={w.bit}", f"it packs integer weights of {'/'.join(map(str, BITS))} "
               "bits (save_vllm stores any integer width and fp8)")


def checkpoint_format(symmetric: bool) -> str:
    return "gptq" if symmetric else "gptq_v2"


def pack_layer(q) -> dict[str, torch.Tensor]:
    bits = q.wargs.bit
    codes, scale, zero, g_idx = group_table(q)
    offset = 1 << (bits - 1)
    zero_u = (zero + offset).to(torch.int32)
    stored = zero_u - 1 if checkpoint_format(q.wargs.symmetric) == "gptq" else zero_u
    return {
        "qweight": pack_int32((codes + offset).to(torch.int32).t(), bits, dim=0),
        "qzeros": pack_int32(stored.t(), bits, dim=1),
        "scales": scale.t().to(torch.float16),
        "g_idx": g_idx,
    }


def block_rules(quantized: list[str], floating: list[str]) -> dict:
    """How loaders learn which linears inside blocks stay float: `dynamic` negative rules (GPTQModel, vLLM)
    and, when every block keeps the same ones, transformers' `modules_in_block_to_quantize`."""
    blocks = defaultdict(set)
    for name in quantized:
        block, rel = split_block_name(name)
        blocks[block].add(rel)
    inside = [n for n in floating if split_block_name(n)[0] in blocks]
    if not inside:
        return {}
    rules = {"dynamic": {f"-:^{n.replace('.', '[.]')}$": {} for n in inside}}
    if len({frozenset(v) for v in blocks.values()}) == 1:
        rules["modules_in_block_to_quantize"] = [sorted(next(iter(blocks.values())))]
    return rules


def save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_gptq") -> None:
    layers = list(quant_linears(model))
    if not layers:
        refuse(key, FORMAT, "a model without quantized linears", "nothing to pack")
    for name, q in layers:
        check(Spec.of(q), key)
        run = run_length(q.wargs.bit)
        for dim, size in (("in_features", q.in_features), ("out_features", q.out_features)):
            if size % run:
                refuse(key, FORMAT, f"{name} ({dim} {size})", f"{q.wargs.bit}-bit values fill int32 words in "
                       f"runs of {run}")
    settings = {(q.wargs.bit, q.wargs.symmetric, q.wargs.granularity, q.wargs.group_size) for _, q in layers}
    if len(settings) > 1:
        refuse(key, FORMAT, f"mixed weight settings {sorted(settings)}", "its config holds one bits/group_size")
    w = layers[0][1].wargs
    tensors = {name: pack_layer(q) for name, q in layers}
    config = {"quant_method": "gptq", "bits": w.bit,
              "group_size": w.group_size if w.granularity == "per_group" else -1,
              "desc_act": any(q.w_gidx is not None for _, q in layers), "sym": w.symmetric,
              "checkpoint_format": checkpoint_format(w.symmetric), "lm_head": False,
              **block_rules([n for n, _ in layers], float_linears(model))}
    write_packed(model, tokenizer, path, tensors, config, recipe, config["checkpoint_format"])


GPTQ = register(PackedFormat("save_gptq", "gptq_quant_model", check, save, scale_dtype="float16"))
