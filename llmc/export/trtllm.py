"""TensorRT-LLM checkpoints (`save_trtllm`, folder `trtllm_quant_model/`): the documented checkpoint format
(config.json + one rank<i>.safetensors per tensor x pipeline parallel rank, `save.trtllm_cfg` tp_size /
pp_size) that `trtllm-build --checkpoint_dir` turns into an engine.

llmc writes its 4-bit grid as `quant_algo: W4A16_AWQ` (TensorRT-LLM's groupwise int4 weight-only GEMM; the
AWQ scales are already folded into the weights, so `pre_quant_scale: false`). Per quantized linear, in the
checkpoint's (out, in) orientation (trtllm-build transposes and interleaves for the GPU it builds for):
  weight                  int8 [out/2, in]   byte (j, k): signed int4 W[2j, k] in the low nibble, W[2j+1, k]
                                              in the high one (TensorRT-LLM's packed int4x2)
  weights_scaling_factor  fp16 [out, in/g]
and W = code·scale: symmetric groups of 64 or 128 (the group sizes its kernels take). Llama's linears map
onto its names: q/k/v fused into `attention.qkv` (rows q, k, v), o → `attention.dense`, gate → `mlp.fc`,
up → `mlp.gate`, down → `mlp.proj`; the rest is stored float16 (the checkpoint dtype), so the fake-quant
grid is found with float16 scales (set for you) and the int4 layers hold it exactly.

Refused: other bits/granularities/group sizes, asymmetric weights (the zero-point variant's layout is
kernel-specific), activation or KV-cache quantization, families other than Llama, a q/k/v or gate/up split
between float and quantized. Tensor parallelism splits qkv per head, fc/gate by rows, dense/proj by input
groups and lm_head by vocabulary rows; pipeline parallelism splits the layers, each stage numbering its
own from 0 (as TensorRT-LLM's converters write them); rank = pp_rank·tp_size + tp_rank.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import yaml
from safetensors.torch import save_file

from llmc.errors import ConfigError, UserError
from llmc.export.atomic import atomic_dir
from llmc.export.packing import RECIPE, PackedFormat, Spec, common_checks, group_table, refuse, register
from llmc.quant.fake_linear import quant_linears

FORMAT = "TensorRT-LLM (W4A16_AWQ)"
GROUPS = (64, 128)
FAMILIES = {"llama": "LlamaForCausalLM"}
LINEARS = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
           "mlp.down_proj": "mlp.proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ROW_PARALLEL = ("attention.dense", "mlp.proj")  # split along inputs under tensor parallelism
NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}


def check(spec: Spec, key: str = "save.save_trtllm") -> None:
    w = common_checks(spec, key, FORMAT)
    if w.is_float or w.bit != 4 or not w.symmetric or w.granularity != "per_group" or w.group_size not in GROUPS:
        refuse(key, FORMAT, f"quant.weight bit={w.bit}, symmetric={w.symmetric}, granularity={w.granularity}, "
               f"group_size={w.group_size}", "llmc writes TensorRT-LLM's groupwise int4 weight-only layout: "
               "bit: 4, symmetric: True, granularity: per_group, group_size: 64 or 128")
    if spec.g_idx:
        refuse(key, FORMAT, "GPTQ actorder without static_groups", "its groups are contiguous runs of input "
               "columns (set quant.special.static_groups: True)")
    if spec.family is not None and spec.family not in FAMILIES:
        refuse(key, FORMAT, f"model family {spec.family}", f"llmc writes TensorRT-LLM checkpoints for "
               f"{', '.join(FAMILIES)} only")


def pack_int4x2(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes [out, in] → int8 [out/2, in]: rows 2j (low nibble) and 2j+1 (high nibble) share a byte."""
    c = codes.to(torch.int16)
    low, high = c[0::2] & 0xF, c[1::2] & 0xF
    return ((high << 4) | low).to(torch.uint8).view(torch.int8)


def quant_tensors(name: str, q, key: str) -> dict[str, torch.Tensor]:
    codes, scale, zero, _ = group_table(q)
    if not bool((zero == 0).all()):
        raise UserError(f"{key}: {name} has zero points; W4A16_AWQ stores symmetric groups")
    if not torch.equal(scale.half().float(), scale):
        raise UserError(f"{key}: {name}'s scales are not float16 numbers (run with quant.weight.scale_dtype unset: "
                        "save_trtllm then finds float16 scales)")
    if q.out_features % 2:
        refuse(key, FORMAT, f"{name} (out_features {q.out_features})", "two output rows share a byte")
    return {"weight": pack_int4x2(codes), "weights_scaling_factor": scale.to(torch.float16)}


def _linear(model, layers: dict, prefix: str, parts: tuple[str, ...], key: str, dtype) -> dict[str, torch.Tensor]:
    """One TensorRT-LLM linear from HF linears fused along outputs (q, k, v) or a single one."""
    names = [f"{prefix}.{p}" if prefix else p for p in parts]
    quantized = [n in layers for n in names]
    if any(quantized) and not all(quantized):
        refuse(key, FORMAT, f"{', '.join(names)} partly float", "TensorRT-LLM fuses them into one linear of one type")
    if all(quantized):
        pieces = [quant_tensors(n, layers[n], key) for n in names]
        out = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    else:
        out = {"weight": torch.cat([model.get_submodule(n).weight.detach() for n in names]).to(dtype)}
    biases = [model.get_submodule(n).bias for n in names]
    if any(b is not None for b in biases):
        out["bias"] = torch.cat([b.detach() for b in biases]).to(dtype)
    return out


def full_weights(model, key: str, dtype) -> tuple[dict[str, dict[str, torch.Tensor]], dict, list[str]]:
    """{TensorRT-LLM module: its tensors} unsplit, the other tensors, and the float linears' names."""
    cfg = model.config
    layers = dict(quant_linears(model))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(cfg.num_hidden_layers):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        modules[f"{trt}.attention.qkv"] = _linear(model, layers, hf, QKV, key, dtype)
        for part, name in LINEARS.items():
            modules[f"{trt}.{name}"] = _linear(model, layers, hf, (part,), key, dtype)
    modules["lm_head"] = _linear(model, layers, "", ("lm_head",), key, dtype) if "lm_head" in layers else \
        {"weight": model.lm_head.weight.detach().to(dtype)}
    other = {"transformer.vocab_embedding.weight": model.model.embed_tokens.weight.detach().to(dtype),
             "transformer.ln_f.weight": model.model.norm.weight.detach().to(dtype)}
    for i in range(cfg.num_hidden_layers):
        for hf, trt in NORMS.items():
            other[f"transformer.layers.{i}.{trt}.weight"] = \
                model.get_submodule(f"model.layers.{i}.{hf}").weight.detach().to(dtype)
    excluded = [m for m, t in modules.items() if "weights_scaling_factor" not in t]
    return modules, other, excluded


def _split_rows(t: torch.Tensor, parts: list[int], tp: int, rank: int, packed: bool) -> torch.Tensor:
    """Rank `rank`'s rows of a tensor whose rows are consecutive blocks `parts` (q, k, v), each split in tp."""
    scale = 2 if packed else 1
    blocks = torch.split(t, [p // scale for p in parts])
    return torch.cat([b.chunk(tp)[rank] for b in blocks])


def rank_tensors(modules, other, cfg, tp: int, pp: int, rank: int) -> dict[str, torch.Tensor]:
    tp_rank, pp_rank = rank % tp, rank // tp
    per_stage = cfg.num_hidden_layers // pp
    stage = range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv = [cfg.num_attention_heads * head, cfg.num_key_value_heads * head, cfg.num_key_value_heads * head]
    out = {}
    for name, tensors in list(modules.items()) + [(k.rsplit(".", 1)[0], {k.rsplit(".", 1)[1]: v})
                                                   for k, v in other.items()]:
        linear = name in modules
        if name.startswith("transformer.layers."):
            index = int(name.split(".")[2])
            if index not in stage:
                continue
            # each pipeline stage numbers its layers from 0, as TensorRT-LLM's converters write them
            name = f"transformer.layers.{index - stage.start}." + name.split(".", 3)[3]
        elif name in ("lm_head", "transformer.ln_f") and pp_rank != pp - 1:
            continue
        elif name == "transformer.vocab_embedding" and pp_rank != 0:
            continue
        for kind, t in tensors.items():
            full = f"{name}.{kind}"
            if tp > 1 and linear:
                if name.endswith(ROW_PARALLEL):
                    if kind != "bias":  # a row-parallel bias is added once, after the all-reduce
                        t = t.chunk(tp, dim=1)[tp_rank]
                    elif tp_rank:
                        t = torch.zeros_like(t)
                else:
                    parts = qkv if name.endswith("attention.qkv") else [t.shape[0] * (2 if kind == "weight"
                                                                                  and t.dtype == torch.int8 else 1)]
                    t = _split_rows(t, parts, tp, tp_rank, kind == "weight" and t.dtype == torch.int8)
            out[full] = t.contiguous()
    return out


def trt_config(cfg, group: int, excluded: list[str], tp: int, pp: int) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"save.save_trtllm: rope_type {rope['rope_type']} is not written by llmc's TensorRT-LLM "
                        "export (only the plain rotary embedding)")
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "architecture": FAMILIES[cfg.model_type], "dtype": "float16", "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_size": head, "hidden_act": cfg.hidden_act, "intermediate_size": cfg.intermediate_size,
        "norm_epsilon": cfg.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
        "rotary_base": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))), "rotary_scaling": None,
        "attn_bias": bool(getattr(cfg, "attention_bias", False)), "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": group,
                         "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": excluded},
    }


def _check_mapping(cfg, tp: int, pp: int, group: int, key: str) -> None:
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    needs = {"num_hidden_layers (pipeline stages)": (cfg.num_hidden_layers, pp),
             "num_key_value_heads": (cfg.num_key_value_heads, tp), "vocab_size": (cfg.vocab_size, tp),
             "intermediate_size / group_size (row-parallel groups)": (cfg.intermediate_size // group, tp),
             "num_attention_heads*head_dim / group_size": (cfg.num_attention_heads * head // group, tp)}
    for what, (n, parts) in needs.items():
        if n % parts:
            raise ConfigError(key, f"tp_size={tp}, pp_size={pp}: the model's {what} = {n} does not split in {parts}")


def check_model(config, hf_config) -> None:
    """trtllm_cfg against the checkpoint's shapes, before any weight loads."""
    if hf_config.model_type not in FAMILIES:
        return  # check() refuses the family
    trt = config.save.trtllm_cfg
    weight = config.stage_configs()[-1].quant.weight
    _check_mapping(hf_config, trt.tp_size if trt else 1, trt.pp_size if trt else 1, weight.group_size,
                   "save.trtllm_cfg")


def save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_trtllm",
         tp_size: int = 1, pp_size: int = 1) -> None:
    cfg = model.config
    layers = dict(quant_linears(model))
    if not layers:
        refuse(key, FORMAT, "a model without quantized linears", "nothing to pack")
    for _, q in layers.items():
        check(Spec.of(q), key)
    if cfg.model_type not in FAMILIES:
        refuse(key, FORMAT, f"model family {cfg.model_type}", f"llmc writes it for {', '.join(FAMILIES)} only")
    groups = {q.wargs.group_size for q in layers.values()}
    if len(groups) > 1:
        refuse(key, FORMAT, f"group sizes {sorted(groups)}", "its config holds one group_size")
    group = groups.pop()
    _check_mapping(cfg, tp_size, pp_size, group, "save.trtllm_cfg")
    modules, other, excluded = full_weights(model, key, torch.float16)
    if pp_size > 1 and any(name.startswith("transformer.layers.") for name in excluded):
        refuse(key, FORMAT, f"float linears inside blocks ({', '.join(excluded[:3])}, ...) with pp_size {pp_size}",
               "each pipeline stage numbers its layers from 0, so one exclude_modules list cannot name them")
    with atomic_dir(path) as tmp:
        for rank in range(tp_size * pp_size):
            save_file(rank_tensors(modules, other, cfg, tp_size, pp_size, rank), str(tmp / f"rank{rank}.safetensors"))
        config = trt_config(cfg, group, excluded, tp_size, pp_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:  # trtllm's runners read the tokenizer from an HF folder; keep it at hand
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE).write_text(yaml.safe_dump({"format": "tensorrt-llm W4A16_AWQ", "llmc_config": recipe},
                                                 sort_keys=False))


def _save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_trtllm") -> None:
    """The registered entry: reads tp_size/pp_size from the recipe's save.trtllm_cfg (LLMC's key)."""
    trt = ((recipe or {}).get("save") or {}).get("trtllm_cfg") or {}
    save(model, tokenizer, path, recipe, key, trt.get("tp_size", 1), trt.get("pp_size", 1))


TRTLLM = register(PackedFormat("save_trtllm", "trtllm_quant_model", check, _save, scale_dtype="float16",
                               check_model=check_model))
