"""`quant.mix_bits` (LLMC's schema): per-layer quantization settings chosen by layer-name patterns.

    mix_bits:
        setting_0: {layer_name: [down_proj#0-1-2-3-28], do_quant: True, weight: {...}, act: {...}}
        setting_1: {layer_name: [o_proj], do_quant: False}

As LLMC's `alloc_bits` and `get_wquantizer`: the settings are read in order setting_0, setting_1, ...; a
pattern `name` covers every block, `name#i-j-k` the blocks i, j and k (a list, not a range); per block, a
pattern names the setting last given for it. A linear takes the setting of the first of its block's patterns
(in the order they were first given) that is a substring of its name within the block (`down_proj` matches
`mlp.down_proj`). `do_quant: False` keeps it float; otherwise it is quantized with the setting's `weight`
section and, when the setting has an `act` section, its activations with that one; a setting without `act`
makes its linears weight-only, even when the stage quantizes activations (LLMC's w_only_mix_bits).
"""
from __future__ import annotations

import re
from typing import Optional

from loguru import logger
from pydantic import field_validator, model_validator

from llmc.config.quant_spec import QuantSpecCfg
from llmc.config.section import Section
from llmc.errors import ConfigError

PATTERN = re.compile(r"^[^#\s]+(#\d+(-\d+)*)?$")


class MixBitsSetting(Section):
    layer_name: list[str]
    do_quant: bool = True
    weight: Optional[QuantSpecCfg] = None
    act: Optional[QuantSpecCfg] = None

    @field_validator("layer_name")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty: list the layer names (or name#block-block-...) this setting applies to")
        for name in v:
            if not PATTERN.match(name):
                raise ValueError(f"'{name}' is not a layer name or name#i-j-k (block ids joined by '-')")
        return v

    @model_validator(mode="after")
    def _sections(self) -> "MixBitsSetting":
        if self.do_quant and self.weight is None:
            raise ValueError("do_quant True needs a weight section (the quantizer of these layers)")
        if not self.do_quant and (self.weight is not None or self.act is not None):
            raise ValueError("do_quant False keeps these layers float: remove its weight/act sections")
        return self

    def patterns(self, n_blocks: int) -> list[tuple[str, list[int]]]:
        """(substring, blocks) per layer_name entry."""
        out = []
        for entry in self.layer_name:
            name, _, ids = entry.partition("#")
            out.append((name, [int(i) for i in ids.split("-")] if ids else list(range(n_blocks))))
        return out


def check_keys(mix: dict) -> None:
    """LLMC reads setting_0 .. setting_{n-1} by index: any other key would never be read."""
    expected = [f"setting_{i}" for i in range(len(mix))]
    if sorted(mix) != sorted(expected):
        wrong = sorted(set(mix) - set(expected))
        raise ConfigError("quant.mix_bits", f"keys {wrong}: settings are named {', '.join(expected)} (read in that "
                          "order; a later setting overrides an earlier one for the same layer name and block)")


def block_maps(mix: dict[str, MixBitsSetting], n_blocks: int) -> list[dict[str, int]]:
    """Per block, pattern -> index of the setting that names it last (LLMC's mix_bits_map)."""
    maps: list[dict[str, int]] = [{} for _ in range(n_blocks)]
    for i in range(len(mix)):
        for name, blocks in mix[f"setting_{i}"].patterns(n_blocks):
            for b in blocks:
                maps[b][name] = i
    return maps


def setting_of(block_map: dict[str, int], name: str) -> Optional[int]:
    return next((i for pattern, i in block_map.items() if pattern in name), None)


def resolve(quant, adapter) -> tuple[set[str], dict]:
    """(full names kept float, {full name: (weight QuantArgs, act QuantArgs or None)}) of quant.mix_bits."""
    from llmc.quant.quantizer import QuantArgs

    mix = quant.mix_bits
    if not mix:
        return set(), {}
    n = len(adapter.block_list())
    floats, args, counts = set(), {}, [0] * len(mix)
    for b, block_map in enumerate(block_maps(mix, n)):
        for name in adapter.block_linear_names(b):
            i = setting_of(block_map, name)
            if i is None:
                continue
            counts[i] += 1
            full, setting = f"{adapter.block_name(b)}.{name}", mix[f"setting_{i}"]
            if not setting.do_quant:
                floats.add(full)
            else:
                args[full] = (QuantArgs.from_cfg(setting.weight), QuantArgs.from_cfg(setting.act))
    for i, count in enumerate(counts):
        s = mix[f"setting_{i}"]
        what = "float" if not s.do_quant else (QuantArgs.from_cfg(s.weight).describe()
                                              + (f", act {QuantArgs.from_cfg(s.act).describe()}" if s.act else
                                                 ", weight-only" if quant.act is not None else ""))
        logger.info(f"mix_bits setting_{i} ({', '.join(s.layer_name)}): {count} linears, {what}")
    return floats, args


def mixing_methods() -> list[str]:
    """The registered methods that quantize each linear on its own grid (one name per method)."""
    from llmc.registry import ALGORITHMS

    seen, names = set(), []
    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        if cls.mixes_bits and cls not in seen:
            seen.add(cls)
            names.append(cls.name)
    return names


def check_mix_bits(config, algo_cls) -> None:
    """Before loading: the method honours per-layer grids, no packed export, and each setting passes the
    method's own checks as if it were the stage's weight/act."""
    q = config.quant
    if not q.mix_bits:
        return
    check_keys(q.mix_bits)
    if not algo_cls.mixes_bits:
        raise ConfigError("quant.mix_bits", f"with {algo_cls.name}: it quantizes every linear with the stage's one "
                          f"setting; mix_bits is available with {', '.join(mixing_methods())}")
    from dataclasses import replace

    from llmc.export.packing import Spec, check_mixed_exports
    from llmc.quant.quantizer import QuantArgs

    base = Spec.of_config(config)
    settings = [q.mix_bits[f"setting_{i}"] for i in range(len(q.mix_bits))]
    mixed = [replace(base, weight=QuantArgs.from_cfg(s.weight), act=QuantArgs.from_cfg(s.act))
             for s in settings if s.do_quant]
    check_mixed_exports(config, [base] + mixed, "quant.mix_bits")
    from llmc.config.checks import ACT_GRANULARITIES, WEIGHT_GRANULARITIES

    for i in range(len(q.mix_bits)):
        s = q.mix_bits[f"setting_{i}"]
        if not s.do_quant:
            continue
        key = f"quant.mix_bits.setting_{i}"
        if s.weight.granularity not in WEIGHT_GRANULARITIES or s.weight.static:
            raise ConfigError(f"{key}.weight", f"granularity {s.weight.granularity}, static {s.weight.static}: weights "
                              f"take one of {', '.join(WEIGHT_GRANULARITIES)}, not static")
        if s.act is not None and (s.act.granularity not in ACT_GRANULARITIES or s.act.static):
            raise ConfigError(f"{key}.act", f"granularity {s.act.granularity}, static {s.act.static}: dynamic "
                              f"activations take one of {', '.join(ACT_GRANULARITIES)}")
        alone = config.model_copy(update={"quant": q.model_copy(update={"weight": s.weight, "act": s.act})})
        try:
            algo_cls.check(alone)
        except ConfigError as err:
            raise ConfigError(key, f"as {algo_cls.name}'s settings: {err}") from None


def check_mix_bits_model(config, adapter) -> None:
    """On the meta model: block ids exist, every pattern names a linear, group sizes divide in_features."""
    mix = config.quant.mix_bits
    if not mix:
        return
    n = len(adapter.block_list())
    for i in range(len(mix)):
        s = mix[f"setting_{i}"]
        for (name, blocks), entry in zip(s.patterns(n), s.layer_name):
            bad = [b for b in blocks if b >= n]
            if bad:
                raise ConfigError(f"quant.mix_bits.setting_{i}.layer_name", f"'{entry}': block {bad[0]} does not "
                                  f"exist; the model has blocks 0-{n - 1}")
            linears = [(b, ln) for b in blocks for ln in adapter.block_linear_names(b) if name in ln]
            if not linears:
                raise ConfigError(f"quant.mix_bits.setting_{i}.layer_name", f"'{entry}' names no linear of these "
                                  f"blocks (block 0 has {', '.join(adapter.block_linear_names(0))})")
            if s.weight is None or s.weight.granularity != "per_group":
                continue
            for b, ln in linears:
                width = adapter.block_list()[b].get_submodule(ln).in_features
                if width % s.weight.group_size:
                    raise ConfigError(f"quant.mix_bits.setting_{i}.weight.group_size", f"{s.weight.group_size} does "
                                      f"not divide in_features {width} of {adapter.block_name(b)}.{ln}")
