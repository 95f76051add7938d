"""compressed-tensors checkpoints for vLLM and SGLang (`save_vllm` → `vllm_quant_model/`, `save_sgl` →
`sgl_quant_model/`, the same format), written through the compressed-tensors package: its
QuantizationArgs/QuantizationScheme/QuantizationConfig describe the grid, its registered compressors pack
each layer and ModelCompressor writes the config; transformers loads the folder on CPU through it.

Formats (chosen per llmc setting):
  pack-quantized   integer weights, no activation quantization: `weight_packed` int32 (codes + 2^(b-1),
                   packed densely along the input dimension), `weight_scale`, `weight_zero_point` (asym,
                   packed along outputs), `weight_shape`
  int-quantized    integer weights with integer activations (W8A8): `weight` int8 codes, `weight_scale`,
                   `weight_zero_point` (asym); static activations add `input_scale` (`input_zero_point`)
  float-quantized  fp8 e4m3 weights (with or without fp8 activations): `weight` float8_e4m3fn, `weight_scale`;
                   per_block weights: strategy block, `weight_scale` [ceil(out / b), in / b] (DeepSeek's layout),
                   with dynamic fp8 activations per token or per group of b (vLLM's block FP8 scheme)
  nvfp4-pack-quantized  weight-only NVFP4: `weight_packed` uint8 (two e2m1 codes a byte), `weight_scale` fp8
                   e4m3 [out, in/16], `weight_global_scale` float32 [1]; compressed-tensors 0.20.1 dequantizes
                   it to bfloat16 weights (its unpacker's dtype), so a reload equals the fake-quant weights
                   rounded to bfloat16
  mxfp4-pack-quantized  weight-only MXFP4: `weight_packed` as above, `weight_scale` uint8 E8M0 exponents
                   [out, in/32] (bfloat16 reload as above)
  A float32 or float16 model's FP4 folder carries `dequantize: true`: compressed-tensors' default load hands
  such a model bfloat16 weights (a dtype mismatch at the first matmul); the dequantizing load casts them.
The zero-point convention is llmc's own: signed codes and zero points, W = (code - zero) * scale, symmetric
means zero = 0. Scales are stored in the model's dtype (what loaders allocate), so a float32 model's
checkpoint dequantizes to exactly its fake-quant weights; this is checked for every layer before writing.

Asymmetric pack-quantized checkpoints (per-group/per-channel zero points, packed along outputs as vLLM and
compressed-tensors' own compressor store them) also carry `dequantize: true`: compressed-tensors 0.18 to
0.20.1 build the meta model transformers loads into with those zero points unpacked ([out, groups]), so
transformers' default compressed load refuses every such checkpoint (llm-compressor's too). The key makes
transformers take its dequantizing load, which reads them right; vLLM and SGLang ignore it.

Linears of several settings (mix_bits, auto_mix_bits) get one config group per setting whose targets name
them; they must share one format. vLLM and compressed-tensors match each module to its group; transformers'
dequantizing CPU load (5.x) takes one scheme for every dense layer and cannot read such a checkpoint.

Refused: e5m2, GPTQ act order with moving groups (compressed-tensors dropped g_idx), activation
granularities other than per_token/per_tensor, integer/float mixes of weights and activations, KV-cache
quantization, and whatever compressed-tensors' own validation rejects.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from loguru import logger

from llmc.errors import UserError
from llmc.export.packing import (PackedFormat, Spec, common_checks, float_linears, group_table, refuse,
                                 register, write_packed)
from llmc.quant.fake_linear import quant_linears

FORMAT = "compressed-tensors"
FP4_FORMATS = ("nvfp4", "mxfp4")
FP4_PACKED = tuple(f"{f}-pack-quantized" for f in FP4_FORMATS)
STRATEGY = {"per_group": "group", "per_channel": "channel", "per_tensor": "tensor", "per_token": "token",
            "per_block": "block"}


def _ct():
    try:
        import compressed_tensors
    except ImportError:
        raise UserError("save_vllm/save_sgl write compressed-tensors checkpoints and need the compressed-tensors "
                        "package: pip install -e '.[export]' (or pip install compressed-tensors)") from None
    return compressed_tensors


def _args(a, dynamic: bool) -> dict:
    if a.quant_type in FP4_FORMATS:  # compressed-tensors' NVFP4A16 / MXFP4A16 weight presets
        scale_dtype = torch.float8_e4m3fn if a.quant_type == "nvfp4" else torch.uint8
        return dict(num_bits=4, type="float", symmetric=True, group_size=a.group_size, dynamic=dynamic,
                    strategy="tensor_group" if a.quant_type == "nvfp4" else "group",
                    scale_dtype=scale_dtype, zp_dtype=scale_dtype)
    block = [a.block_size, a.block_size] if a.granularity == "per_block" else None
    return dict(num_bits=8 if a.is_float else a.bit, type="float" if a.is_float else "int",
                symmetric=a.symmetric or a.is_float,  # llmc's float grids are symmetric whatever the flag
                strategy=STRATEGY[a.granularity], group_size=a.group_size if a.granularity == "per_group" else None,
                block_structure=block, dynamic=dynamic)


def compression_format(spec: Spec) -> str:
    if spec.weight.quant_type in FP4_FORMATS:
        return f"{spec.weight.quant_type}-pack-quantized"
    if spec.weight.is_float:
        return "float-quantized"
    return "int-quantized" if spec.act is not None else "pack-quantized"


def scheme_of(spec: Spec, key: str, targets: Optional[list[str]] = None):
    """The config group of `spec`: every Linear, or the named modules (one group per setting of a mix)."""
    _ct()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    try:
        weights = QuantizationArgs(**_args(spec.weight, dynamic=False))
        inputs = QuantizationArgs(**_args(spec.act, dynamic=not spec.act.static)) if spec.act else None
        return QuantizationScheme(targets=targets or ["Linear"], weights=weights, input_activations=inputs,
                                  format=compression_format(spec))
    except (ValueError, NotImplementedError) as err:  # pydantic's ValidationError is a ValueError
        refuse(key, FORMAT, f"weight {spec.weight.describe()}" + (f", act {spec.act.describe()}" if spec.act else ""),
               f"compressed-tensors rejects it ({str(err).splitlines()[0]})")


def check(spec: Spec, key: str = "save.save_vllm") -> None:
    w, a = common_checks(spec, key, FORMAT, weight_only=False, blocks=True), spec.act
    if w.granularity == "per_block" and not (w.is_float and w.bit == "e4m3"):
        refuse(key, FORMAT, f"per_block {w.describe()} weights", "llmc writes block-wise scales for fp8 e4m3 "
               "weights (vLLM's block FP8 scheme); use bit e4m3, or save_fake")
    block_acts = w.granularity == "per_block" and a is not None and a.granularity == "per_group"
    if block_acts and (a.group_size != w.block_size or a.static):
        refuse(key, FORMAT, f"quant.act group_size {a.group_size} (static {a.static}) with {w.block_size} x "
               f"{w.block_size} weight blocks", "vLLM's block FP8 scheme quantizes activations dynamically per "
               "group of the block size; set act.group_size to weight.block_size")
    if a is not None and not a.static and a.clip_ratio != 1:
        refuse(key, FORMAT, f"act clip_ratio {a.clip_ratio} with dynamic activations", "engines take each token's "
               "own min/max at run time; use static activations (the clipped range is then stored) or save_fake")
    if w.quant_type in FP4_FORMATS and a is not None:
        refuse(key, FORMAT, f"quant.act with quant.weight.quant_type={w.quant_type}", "llmc writes "
               f"{w.quant_type}-pack-quantized weight-only (drop quant.act, or save_fake for the fake-quant model)")
    if w.quant_type == "nf4" or (w.quant_type == "float-quant" and w.bit == "e2m1"):
        refuse(key, FORMAT, f"quant.weight.quant_type={w.quant_type} (bit {w.bit})", "compressed-tensors stores "
               "FP4 as nvfp4 (groups of 16, fp8 scales) or mxfp4 (groups of 32, E8M0 scales) and has no NF4; use "
               "quant_type nvfp4/mxfp4, or save_fake")
    if w.quant_type == "float-quant" and w.bit == "e5m2":
        refuse(key, FORMAT, f"quant.weight.bit={w.bit}", "its fp8 type is e4m3")
    if spec.g_idx:
        refuse(key, FORMAT, "GPTQ actorder without static_groups", "compressed-tensors removed g_idx (group act "
               "order); set quant.special.static_groups: True, or use save_gptq")
    if a is not None:
        if a.granularity not in ("per_token", "per_tensor") and not block_acts:
            refuse(key, FORMAT, f"quant.act.granularity={a.granularity}", "activations are quantized per_token "
                   "(dynamic) or per_tensor (static or dynamic) by vLLM's compressed-tensors schemes")
        if a.is_float != w.is_float or (a.is_float and a.bit != "e4m3"):
            refuse(key, FORMAT, f"quant.act.bit={a.bit} with quant.weight.bit={w.bit}", "weights and activations "
                   "are both integer (int-quantized) or both fp8 e4m3 (float-quantized)")
    scheme_of(spec, key)


def check_mixed(specs: list[Spec], key: str = "save.save_vllm") -> None:
    """Linears of several settings: each storable, all in one compression format (the checkpoint has one)."""
    for spec in specs:
        check(spec, key)
    formats = {compression_format(s) for s in specs}
    if len(formats) > 1:
        refuse(key, FORMAT, f"layers in the formats {', '.join(sorted(formats))} in one checkpoint", "a checkpoint "
               "has one compression format; keep every setting weight-only (or every one with activations), of "
               "one weight type")


def _qparam(t: torch.Tensor, q) -> torch.Tensor:
    """llmc's per-row parameter in compressed-tensors' shape: [out, groups], [out, 1], [1] (per tensor) or
    [ceil(out / b), in / b] (per_block: llmc repeats each tile's scale over its b rows)."""
    if q.wargs.granularity == "per_block":
        return t.reshape(q.out_features, -1)[::q.wargs.block_size]
    return t.reshape(1) if q.wargs.granularity == "per_tensor" else t.reshape(q.out_features, -1)


def compress_layer(name: str, q, scheme, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import BaseCompressor

    if q.wargs.quant_type in FP4_FORMATS:
        return _compress_fp4(name, q, scheme, fmt)
    if q.wargs.granularity == "per_block":
        return _compress_blocks(name, q, scheme, fmt, dtype)

    codes, scale_t, zero_t, g_idx = group_table(q)
    scale = _qparam(q.w_scale.float().cpu(), q).to(dtype)
    asym = not scheme.weights.symmetric
    state = {"weight_scale": scale}
    if asym:
        state["weight_zero_point"] = _qparam(q.w_zero.cpu(), q).to(torch.int8)
    # The weight handed over is llmc's grid itself (codes from int_weight(), the stored scale): the
    # compressor divides it by the same scale, so it recovers llmc's codes, not codes of its own rounding.
    scale_e = scale_t.to(dtype)[:, g_idx].float()
    zero_e = zero_t[:, g_idx]
    state["weight"] = (codes - zero_e) * scale_e
    act = q.act_quant
    if act is not None and act.args.static:
        state["input_scale"] = act.scale.reshape(1).cpu().to(dtype)
        if not scheme.input_activations.symmetric:
            state["input_zero_point"] = act.zero.reshape(1).cpu().to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed = compressor.compress(state, scheme)
    # Dequantizing what will be written must give llmc's grid exactly (in the stored scale's dtype).
    back = compressor.decompress(dict(packed), scheme)["weight"]
    expected = (codes.to(dtype) - zero_e.to(dtype)) * scale_e.to(dtype)
    if back.shape != expected.shape or not torch.equal(back.to(dtype), expected):
        raise RuntimeError(f"compressed-tensors {_ct().__version__} did not store {name} on llmc's grid")
    return packed


def _compress_fp4(name: str, q, scheme, fmt: str) -> dict[str, torch.Tensor]:
    """NVFP4 / MXFP4: llmc's e2m1 values and scales handed to the compressor, which packs them; the stored
    scale is the format's own (fp8 value = effective scale x global scale; E8M0 of a power of two)."""
    from compressed_tensors.compressors import BaseCompressor

    if q.w_scale is None:
        q.set_weight_qparams()
    values = q.int_weight().reshape(q.out_features, q.in_features).cpu()
    scale = _qparam(q.w_scale.float().cpu(), q)
    state = {"weight": values * scale.repeat_interleave(q.wargs.group_size, dim=1)}
    if q.wargs.quant_type == "nvfp4":
        gs = torch.tensor([q.wargs.global_scale], dtype=torch.float32)
        state["weight_scale"] = (scale * gs).to(torch.float8_e4m3fn).float()
        state["weight_global_scale"] = gs
        if not torch.equal(state["weight_scale"] / gs, scale):
            raise RuntimeError(f"{name}: NVFP4 scales are not fp8 values under the global scale")
    else:
        state["weight_scale"] = scale
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed = compressor.compress(state, scheme)
    back = compressor.decompress(dict(packed), scheme)["weight"]
    expected = (values * scale.repeat_interleave(q.wargs.group_size, dim=1)).to(back.dtype)
    if back.shape != expected.shape or not torch.equal(back, expected):
        raise RuntimeError(f"compressed-tensors {_ct().__version__} did not store {name} on llmc's grid")
    return packed


def _compress_blocks(name: str, q, scheme, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Block-wise fp8: llmc's grid values times their tile scales handed to the compressor, which divides by
    the [ceil(out / b), in / b] scales it is given and casts to fp8; checked to dequantize to the fake weight."""
    from compressed_tensors.compressors import BaseCompressor

    if q.w_scale is None:
        q.set_weight_qparams()
    b = q.wargs.block_size
    scale = _qparam(q.w_scale.float().cpu(), q).to(dtype)
    full = scale.float().repeat_interleave(b, 0)[:q.out_features].repeat_interleave(b, 1)
    values = q.int_weight().reshape(q.out_features, q.in_features).cpu()
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed = compressor.compress({"weight": values * full, "weight_scale": scale}, scheme)
    back = compressor.decompress(dict(packed), scheme)["weight"]
    if back.shape != values.shape or not torch.equal(back.to(dtype), (values * full).to(dtype)):
        raise RuntimeError(f"compressed-tensors {_ct().__version__} did not store {name} on llmc's grid")
    return packed


def save(model, tokenizer, path, recipe: Optional[dict] = None, key: str = "save.save_vllm") -> None:
    _ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    layers = list(quant_linears(model))
    if not layers:
        refuse(key, FORMAT, "a model without quantized linears", "nothing to compress")
    spec_of = {name: Spec.of(q) for name, q in layers}
    by_spec: dict[Spec, list[str]] = {}
    for name, spec in spec_of.items():
        by_spec.setdefault(spec, []).append(name)
    check_mixed(list(by_spec), key)
    fmt = compression_format(next(iter(by_spec)))
    # one setting: one group over every Linear; a mix (mix_bits): one group per setting naming its modules
    schemes = {spec: scheme_of(spec, key, None if len(by_spec) == 1 else names) for spec, names in by_spec.items()}
    if len(by_spec) > 1:
        logger.info(f"{key}: {len(by_spec)} config groups, one per setting (vLLM, SGLang and compressed-tensors match "
                    "each module to its group; transformers' dequantizing load reads one scheme for all dense layers)")
    dtype = layers[0][1].weight.dtype
    tensors = {name: compress_layer(name, q, schemes[spec_of[name]], fmt, dtype) for name, q in layers}
    config = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(schemes.values())}, format=fmt,
                                ignore=float_linears(model), quantization_status="compressed")

    def finish(folder) -> None:
        ModelCompressor(quantization_config=config).update_config(str(folder))
        packed_zeros = any(packed_zero_points(s, fmt) for s in schemes.values())
        if packed_zeros or (fmt in FP4_PACKED and dtype != torch.bfloat16):
            config_file = folder / "config.json"
            data = json.loads(config_file.read_text())
            data["quantization_config"]["dequantize"] = True
            config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    write_packed(model, tokenizer, path, tensors, None, recipe, f"compressed-tensors {fmt}", finish=finish)


def packed_zero_points(scheme, fmt: str) -> bool:
    """Whether the checkpoint stores int32-packed zero points, which transformers' compressed load (through
    compressed-tensors 0.18-0.20.1) allocates unpacked: pack-quantized, asymmetric, per group or channel."""
    w = scheme.weights
    return fmt == "pack-quantized" and not w.symmetric and w.strategy in ("group", "channel")


VLLM = register(PackedFormat("save_vllm", "vllm_quant_model", check, save, check_mixed=check_mixed))
SGL = register(PackedFormat("save_sgl", "sgl_quant_model", check, save, check_mixed=check_mixed))
# LLMC's save_lightllm writes the checkpoint its save_vllm writes, into lightllm_quant_model/.
LIGHTLLM = register(PackedFormat("save_lightllm", "lightllm_quant_model", check, save, check_mixed=check_mixed))
