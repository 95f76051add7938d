"""GGUF files for llama.cpp (`save_gguf`, folder `gguf_quant_model/`, file `model.gguf`), written with the
`gguf` package where llmc's grid is exactly a GGUF block type:

  symmetric 4-bit, groups of 32   → Q4_0: per block fp16 d, 32 4-bit q;  w = (q - 8)·d
  asymmetric 4-bit, groups of 32  → Q4_1: per block fp16 d, fp16 m, 32 4-bit q;  w = q·d + m
  symmetric 8-bit, groups of 32   → Q8_0: per block fp16 d, 32 int8 q;  w = q·d

llmc's codes c (signed) and zero points z give q = c + 8 (4-bit) or c (8-bit), d = scale and, for Q4_1,
m = -(z + 8)·scale. Both d and m are stored in float16, so a run with save_gguf finds its grids with such
scales from the start (`scale_dtype: float16`; asymmetric: `float16_7bit`, which keeps m a float16 too) and
the file dequantizes to the fake-quant weights bit for bit; this is checked per layer before writing.
Everything else (embeddings, norms, float linears) is stored F32. Llama's q/k rows are permuted into
llama.cpp's rotary layout, as its HF converter does (loaders undo it).

Refused before any weight loads: other bits, group sizes or symmetries (naming the nearest type that maps),
activation or KV-cache quantization, act order with moving groups, and families other than Llama.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import yaml

from llmc.errors import UserError
from llmc.export.atomic import atomic_dir
from llmc.export.packing import RECIPE, PackedFormat, Spec, common_checks, group_table, refuse, register
from llmc.export.save import plain_linears
from llmc.quant.fake_linear import quant_linears
from llmc.quant.quantizer import QuantArgs

FORMAT = "GGUF"
FILE = "model.gguf"
BLOCK = 32
FAMILIES = {"llama": "llama"}  # model_type → GGUF architecture (tensor names and q/k permutation are Llama's)
SCALE_DTYPES = {"Q4_0": "float16", "Q4_1": "float16_7bit", "Q8_0": "float16"}


def gguf_type(w: QuantArgs) -> Optional[str]:
    """The GGUF block type llmc's weight grid is exactly, or None."""
    if w.is_float or w.granularity != "per_group" or w.group_size != BLOCK:
        return None
    if w.bit == 4:
        return "Q4_0" if w.symmetric else "Q4_1"
    if w.bit == 8 and w.symmetric:
        return "Q8_0"
    return None


def nearest(w: QuantArgs) -> str:
    if not w.is_float and w.bit <= 4:
        sym = "True" if w.symmetric else "False"
        return f"bit: 4, symmetric: {sym}, granularity: per_group, group_size: 32 ({'Q4_0' if w.symmetric else 'Q4_1'})"
    return "bit: 8, symmetric: True, granularity: per_group, group_size: 32 (Q8_0)"


def check(spec: Spec, key: str = "save.save_gguf") -> None:
    w = common_checks(spec, key, FORMAT)
    kind = gguf_type(w)
    if kind is None:
        setting = (f"quant.weight bit={w.bit}, symmetric={w.symmetric}, granularity={w.granularity}, "
                   f"group_size={w.group_size}")
        refuse(key, FORMAT, setting, f"its block types hold 4-bit groups of 32 (Q4_0 symmetric, Q4_1 "
               f"asymmetric) or symmetric 8-bit groups of 32 (Q8_0); nearest: {nearest(w)}")
    if w.scale_dtype not in (None, SCALE_DTYPES[kind]):
        refuse(key, FORMAT, f"quant.weight.scale_dtype={w.scale_dtype}", f"{kind} stores float16 scales"
               f"{' and minima' if kind == 'Q4_1' else ''}, exact only with scale_dtype {SCALE_DTYPES[kind]} "
               "(remove scale_dtype: save_gguf sets it)")
    if spec.g_idx:
        refuse(key, FORMAT, "GPTQ actorder without static_groups", "its blocks are contiguous runs of 32 input "
               "columns (set quant.special.static_groups: True)")
    if spec.family is not None and spec.family not in FAMILIES:
        refuse(key, FORMAT, f"model family {spec.family}", f"llmc writes GGUF for {', '.join(FAMILIES)} only")


def scale_dtype(w: Optional[QuantArgs]) -> Optional[str]:
    kind = gguf_type(w) if w is not None else None
    return SCALE_DTYPES.get(kind)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def pack_layer(name: str, q, key: str) -> tuple[np.ndarray, str]:
    """One quantized linear as GGUF blocks: uint8 [out, bytes per row], and its type name."""
    kind = gguf_type(q.wargs)
    codes, scale, zero, _ = group_table(q)
    out, inp = codes.shape
    groups = inp // BLOCK
    d = scale.reshape(out, groups)
    if not torch.equal(d.half().float(), d):
        raise UserError(f"{key}: {name}'s scales are not float16 numbers, so {kind} cannot hold its grid exactly "
                        "(run with quant.weight.scale_dtype unset: save_gguf then finds float16 scales)")
    parts = [_f16_bytes(d)]
    if kind == "Q4_1":
        m = -(zero.reshape(out, groups) + 8) * d
        if not torch.equal(m.half().float(), m):
            raise UserError(f"{key}: {name}: a group minimum -(zero+8)·scale is not a float16, so Q4_1 would "
                            "round it (quant.weight.scale_dtype float16_7bit makes every one exact)")
        parts.append(_f16_bytes(m))
    elif not bool((zero == 0).all()):
        raise UserError(f"{key}: {name} has non-zero zero points, which {kind} cannot store")
    blocks = codes.reshape(out, groups, BLOCK).to(torch.int64)
    if kind == "Q8_0":
        parts.append(blocks.to(torch.int8).numpy().view(np.uint8))
    else:  # byte j holds q[j] in its low nibble and q[j + 16] in its high one
        u = (blocks + 8).to(torch.uint8)
        parts.append((u[..., :16] | (u[..., 16:] << 4)).numpy())
    data = np.concatenate(parts, axis=-1).reshape(out, -1)
    check_exact(name, data, kind, q.fake_weight().detach().float().cpu(), key)
    return data, kind


def check_exact(name: str, data: np.ndarray, kind: str, fake: torch.Tensor, key: str) -> None:
    """What llama.cpp reads back (gguf's own dequantizer) must be the fake-quant weight bit for bit."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    back = torch.from_numpy(np.ascontiguousarray(dequantize(data, GGMLQuantizationType[kind])))
    if not torch.equal(back.reshape(fake.shape), fake):
        diff = (back.reshape(fake.shape) - fake).abs().max().item()
        raise UserError(f"{key}: {name} dequantizes {diff:.3g} away from its fake-quant weight in {kind}")


def permute_rows(x, n_head: int):
    """llama.cpp's rotary layout for Llama's q/k rows (its HF converter's `permute`): per head, the two
    halves of rotate_half interleaved."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _metadata(writer, cfg, n_blocks: int, kind: str) -> None:
    import gguf

    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"save.save_gguf: rope_type {rope['rope_type']} is not written by llmc's GGUF export "
                        "(only the plain rotary embedding)")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(getattr(cfg, "_name_or_path", "") or "llmc")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(writer, tokenizer) -> bool:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) as llama.cpp's `gpt2` model; others skipped."""
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        return False
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    return True


def save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_gguf") -> None:
    import gguf
    from loguru import logger

    cfg = model.config
    layers = dict(quant_linears(model))
    if not layers:
        refuse(key, FORMAT, "a model without quantized linears", "nothing to pack")
    for name, q in layers.items():
        check(Spec.of(q), key)
    if cfg.model_type not in FAMILIES:
        refuse(key, FORMAT, f"model family {cfg.model_type}", f"llmc writes GGUF for {', '.join(FAMILIES)} only")
    kinds = {gguf_type(q.wargs) for q in layers.values()}
    if len(kinds) > 1:
        refuse(key, FORMAT, f"layers of different types {sorted(kinds)}", "llmc writes one block type per file")
    kind = kinds.pop()
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    with atomic_dir(path) as tmp, plain_linears(model, fake=False):
        writer = gguf.GGUFWriter(str(tmp / FILE), FAMILIES[cfg.model_type])
        _metadata(writer, cfg, n_blocks, kind)
        if tokenizer is None or not _tokenizer(writer, tokenizer):
            logger.info(f"{key}: the tokenizer is not byte-level BPE; {FILE} carries no tokenizer "
                        "(llama.cpp needs one: add it with its gguf tools)")
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # a GGUF without output.weight ties it to token_embd (llama.cpp and transformers)
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"{key}: no GGUF name for {hf_name}")
            module = hf_name.rsplit(".", 1)[0]
            if module in layers and hf_name.endswith(".weight"):
                data, qtype = pack_layer(module, layers[module], key)
                raw = gguf.GGMLQuantizationType[qtype]
            else:
                data, raw = tensor.detach().float().cpu().numpy(), None
            if gname.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
                heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
                data = permute_rows(data, heads)
            writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / RECIPE).write_text(yaml.safe_dump({"format": f"gguf {kind}", "llmc_config": recipe}, sort_keys=False))


GGUF = register(PackedFormat("save_gguf", "gguf_quant_model", check, save, scale_dtype=scale_dtype))
