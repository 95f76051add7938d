"""Shared pieces of the packed (real-quantized) exports: what a format is asked to store (`Spec`), llmc's
grid as per-group tables, dense int32 bit packing, and the atomic writer of an HF folder whose quantized
linears are replaced by a format's tensors.

The formats register in EXPORTERS under their `save.<key>`; `packed_exports(config)` returns the chosen
ones after checking the config against each, so a setting a format cannot store is refused before any
weight is loaded (and again, per layer, before anything is written).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from torch import nn

from llmc.errors import ConfigError
from llmc.export.atomic import atomic_dir
from llmc.export.save import plain_linears
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs
from llmc.registry import EXPORTERS

RECIPE = "llmc_recipe.yaml"


@dataclass(frozen=True)
class Spec:
    """What one quantized linear (or the config, before the run) asks a format to store."""

    weight: Optional[QuantArgs]
    act: Optional[QuantArgs] = None
    g_idx: bool = False     # GPTQ act order without static groups: a column's group is not column // group_size
    kvcache: bool = False
    float_cols: bool = False  # OWQ: some input columns stay float
    axis0: bool = False       # HQQ axis 0: groups run along output channels
    family: Optional[str] = None  # the checkpoint's model_type, for formats that name tensors per architecture

    @classmethod
    def of(cls, q: QuantLinear) -> "Spec":
        return cls(q.wargs, q.act_quant.args if q.act_quant is not None else None, q.w_gidx is not None,
                   float_cols=q.w_float_cols is not None, axis0=q.w_axis == 0)

    @classmethod
    def of_config(cls, config, family: Optional[str] = None) -> "Spec":
        quant = config.stage_configs()[-1].quant  # the last stage's grid is the one the model ends with
        weight = QuantArgs.from_cfg(quant.weight)
        special = quant.special or {}
        g_idx = (quant.method.lower() == "gptq" and bool(special.get("actorder"))
                 and not special.get("static_groups") and weight is not None and weight.granularity == "per_group")
        from llmc.config.checks import algorithm_options

        _, options = algorithm_options(config.stage_configs()[-1])
        return cls(weight, QuantArgs.from_cfg(quant.act), g_idx, quant.kvcache is not None,
                   float_cols=bool(getattr(options, "owq", False)), axis0=getattr(options, "axis", 1) == 0,
                   family=family)


@dataclass(frozen=True)
class PackedFormat:
    key: str                                # save.<key> turns it on
    folder: str                             # written under save_path (LLMC's folder names)
    check: Callable[[Spec, str], None]      # raises ConfigError(key, ...) for what the format cannot store
    save: Callable[..., None]               # save(model, tokenizer, path, recipe=None, key=...)
    # the dtype the format stores scales in, when not the model's (or a function of the weight settings)
    scale_dtype: Optional[str | Callable[[QuantArgs], Optional[str]]] = None
    # checks needing the checkpoint's config (shapes against the format's layout), before any weight loads
    check_model: Optional[Callable[[object, object], None]] = None
    # formats that store linears of several settings in one checkpoint (mix_bits): raises for what it cannot
    check_mixed: Optional[Callable[[list[Spec], str], None]] = None

    def stored_scale_dtype(self, weight: Optional[QuantArgs]) -> Optional[str]:
        return self.scale_dtype(weight) if callable(self.scale_dtype) else self.scale_dtype


def register(fmt: PackedFormat) -> PackedFormat:
    return EXPORTERS.register(fmt.key)(fmt)


def packed_exports(config, hf_config=None) -> list[PackedFormat]:
    """The packed formats `config.save` turns on, each checked against the quant settings (and the
    checkpoint's config, when known: its family and shapes)."""
    import llmc.export.autoawq  # noqa: F401  (registration)
    import llmc.export.compressed  # noqa: F401
    import llmc.export.gguf_format  # noqa: F401
    import llmc.export.gptq_format  # noqa: F401
    import llmc.export.trtllm  # noqa: F401

    chosen = [EXPORTERS.get(key) for key in EXPORTERS if getattr(config.save, key, False)]
    spec = Spec.of_config(config, getattr(hf_config, "model_type", None))
    for fmt in chosen:
        fmt.check(spec, f"save.{fmt.key}")
        if fmt.check_model is not None and hf_config is not None:
            fmt.check_model(config, hf_config)
    return chosen


def check_mixed_exports(config, specs: list[Spec], why: str) -> None:
    """Before loading: every packed format `config.save` turns on can hold linears of all these settings
    in one checkpoint (`why` names the key that mixes them)."""
    for fmt in packed_exports(config):
        if fmt.check_mixed is None:
            raise ConfigError(f"save.{fmt.key}", f"True with {why}: the {fmt.folder} "
                              "format holds one quantization setting per checkpoint; use save_vllm/save_sgl "
                              "(compressed-tensors, one config group per setting) or save_fake")
        fmt.check_mixed(specs, f"save.{fmt.key}")


def refuse(key: str, fmt: str, setting: str, why: str) -> None:
    raise ConfigError(key, f"the {fmt} format cannot store {setting}: {why}")


def common_checks(spec: Spec, key: str, fmt: str, weight_only: bool = True, blocks: bool = False) -> QuantArgs:
    """Refusals shared by the formats (`blocks`: the format stores per_block scales); returns the weight args."""
    if spec.weight is None:
        refuse(key, fmt, "a model without weight quantization", "it stores quantized weights (set quant.weight)")
    if spec.kvcache:
        refuse(key, fmt, "quant.kvcache", "the KV-cache fake quantization is not part of the checkpoint "
               "(drop quant.kvcache, or save_fake for the fake-quant model)")
    if weight_only and spec.act is not None:
        refuse(key, fmt, "quant.act (activation quantization)", "it is a weight-only format "
               "(use save_vllm for weight-activation quantization)")
    w = spec.weight
    if w.two_level is not None:
        refuse(key, fmt, f"two-level weights ({w.describe()})", "it holds one grid of scales per group; the 8-bit "
               "channel base under integer group scales is not stored by any packed export here; save_fake writes "
               "the fake-quant model")
    if w.granularity == "per_block" and not blocks:
        refuse(key, fmt, f"block-wise scales (granularity per_block, block_size {w.block_size})", "it stores "
               "per-tensor, per-channel or per-group scales; save_fake writes the fake-quant model")
    if not w.round_zp:
        refuse(key, fmt, "float zero points (quant.weight.round_zp: False)", "it stores integer zero points; "
               "set round_zp: True (HQQ then rounds its optimised zero points), or save_fake")
    if any(a is not None and a.full_range for a in (w, spec.act)):
        refuse(key, fmt, "the full-range symmetric grid (full_range: True, INC's enable_full_range)", "its scales "
               "are negative where a group's absmax is a positive value, which this format's loaders and kernels "
               "are not checked against; remove full_range, or save_fake")
    if spec.float_cols:
        refuse(key, fmt, "OWQ's float input columns (quant.special.owq: True)", "its linears hold one integer grid "
               "for every column; save_fake writes the OWQ model")
    if spec.axis0:
        refuse(key, fmt, "groups along output channels (HQQ axis: 0)", "its groups run along input columns; "
               "set quant.special.axis: 1, or save_fake")
    return w


def group_table(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """llmc's grid of one linear as per-group tables: codes [out, in] (signed, as floats), scale and zero
    [out, groups] (float32) and the group of every input column [in] (int32). Per-channel is one group;
    per-tensor is one group whose scale repeats on every row, which is the same grid."""
    out, inp = q.out_features, q.in_features
    if q.w_scale is None:  # never used since installed: the grid fake_weight() would calibrate
        q.set_weight_qparams()
    codes = q.int_weight().reshape(out, inp).cpu()  # packing and writing happen on the CPU
    scale, zero = q.w_scale.float().cpu(), q.w_zero.float().cpu()
    if scale.numel() == 1:
        scale, zero = scale.reshape(1, 1).expand(out, 1), zero.reshape(1, 1).expand(out, 1)
    scale, zero = scale.reshape(out, -1).contiguous(), zero.reshape(out, -1).contiguous()
    if q.w_gidx is not None:
        g_idx = q.w_gidx.to(torch.int32).cpu()
    else:
        g_idx = torch.arange(inp, dtype=torch.int32) // (inp // scale.shape[1])
    return codes, scale, zero, g_idx


def run_length(bits: int) -> int:
    """Values per run of whole int32 words: 32/bits for 2, 4, 8 bits; 32 (in 3 words) for 3 bits."""
    return 32 // math.gcd(bits, 32)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed densely into int32 words along `dim`, little-endian: value j of a
    run of `run_length(bits)` values occupies bits [bits*j, bits*(j+1)) of the run's words, so 3-bit values
    may straddle two words. This is GPTQ's layout for 2/3/4/8 bits, and AutoAWQ's once its columns are
    interleaved."""
    v = values.movedim(dim, -1).to(torch.int64)
    n, run = v.shape[-1], run_length(bits)
    if n % run:
        raise ValueError(f"{n} values do not fill whole int32 words at {bits} bits (need a multiple of {run})")
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values outside the unsigned {bits}-bit range")
    words_per_run = bits * run // 32
    words = torch.zeros(*v.shape[:-1], n * bits // 32, dtype=torch.int64, device=v.device)
    for j in range(run):
        word, offset = divmod(bits * j, 32)
        column = v[..., j::run]
        words[..., word::words_per_run] |= (column << offset) & 0xFFFFFFFF
        if offset + bits > 32:  # the high bits continue in the next word
            words[..., word + 1::words_per_run] |= column >> (32 - offset)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def float_linears(model: nn.Module) -> list[str]:
    """Names of the linears left in float (lm_head, ignored layers): the formats' exclusion lists."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def split_block_name(name: str) -> tuple[str, str]:
    """('model.layers.3', 'mlp.down_proj') for 'model.layers.3.mlp.down_proj'; ('', name) outside blocks."""
    match = re.match(r"^(.*?\.\d+)\.(.+)$", name)
    return (match.group(1), match.group(2)) if match else ("", name)


def write_packed(model: nn.Module, tokenizer, path, tensors: dict[str, dict[str, torch.Tensor]],
                 quantization_config: Optional[dict], recipe: Optional[dict], fmt: str,
                 finish: Optional[Callable[[Path], None]] = None) -> None:
    """Write an HF folder atomically: the model's state with each quantized linear's `weight` replaced by
    `tensors[name]` (its bias kept), `quantization_config` added to config.json (or `finish(folder)` run to
    add it), the tokenizer, and the llmc config that made it."""
    with atomic_dir(path) as tmp, plain_linears(model, fake=False):
        state = model.state_dict()
        for name, entries in tensors.items():
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v.contiguous().cpu() for k, v in entries.items()})
        model.save_pretrained(tmp, state_dict=state)
        if quantization_config is not None:
            config_file = tmp / "config.json"
            data = json.loads(config_file.read_text())
            data["quantization_config"] = quantization_config
            config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if finish is not None:
            finish(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE).write_text(yaml.safe_dump({"format": fmt, "llmc_config": recipe}, sort_keys=False))
