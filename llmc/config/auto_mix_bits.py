"""`quant.auto_mix_bits`: per-linear bit widths chosen from the calibration data under an average budget.

    auto_mix_bits:
        avg_bits: 3.5        # bits per weight over the quantized linears, scales and zero points included
        options: [3, 4]      # code widths to choose from; the weight section gives the rest of the grid
        n_samples: 32        # calibration samples (whole batches) the errors are measured on; default all

Each block, before its method runs, measures for every linear and option the block's output error with only
that linear round-to-nearest at that width, then spends its share of the budget where the error falls most
per bit (llmc/engine/bit_budget.py). Unlike LLMC's `mix_bits`, no layer is named.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from llmc.config.section import Section
from llmc.errors import ConfigError


class AutoMixBitsCfg(Section):
    avg_bits: float = Field(gt=0)
    options: list[int]
    n_samples: Optional[int] = Field(None, ge=1)

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[int]) -> list[int]:
        if len(set(v)) < 2:
            raise ValueError(f"{v}: give at least two different code widths to choose from, e.g. [3, 4]")
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"{bad}: integer code widths from 2 to 8")
        return sorted(set(v))


def check_auto_mix_bits(config, algo_cls) -> None:
    """Before loading: a method with per-linear grids, an integer weight grid, no LLMC mix_bits beside it,
    calibration data, no packed export (one setting per checkpoint)."""
    q = config.quant
    auto = q.auto_mix_bits
    if auto is None:
        return
    if q.mix_bits:
        raise ConfigError("quant.auto_mix_bits", "set together with quant.mix_bits: choose the layers' widths by "
                          "name (mix_bits) or from the data (auto_mix_bits), not both")
    if not algo_cls.mixes_bits:
        from llmc.config.mix_bits import mixing_methods

        raise ConfigError("quant.auto_mix_bits", f"with {algo_cls.name}: it quantizes every linear with the stage's "
                          f"one setting; auto_mix_bits is available with {', '.join(mixing_methods())}")
    if q.weight is None or q.weight.quant_type != "int-quant" or isinstance(q.weight.bit, str):
        raise ConfigError("quant.auto_mix_bits", "needs an integer weight grid (quant.weight with quant_type "
                          "int-quant): its options are integer code widths")
    if config.calib is None:
        raise ConfigError("calib", "quant.auto_mix_bits measures each linear's sensitivity on calibration data: "
                          "add a calib section")
    from dataclasses import replace

    from llmc.export.packing import Spec, check_mixed_exports

    base = Spec.of_config(config)
    check_mixed_exports(config, [replace(base, weight=replace(base.weight, bit=b)) for b in auto.options],
                        "quant.auto_mix_bits")


def check_auto_mix_bits_model(config, adapter) -> None:
    """On the meta model: avg_bits lies between what the narrowest and the widest option cost."""
    from dataclasses import replace

    from llmc.quant.bits import planned_bits
    from llmc.quant.quantizer import QuantArgs

    auto = config.quant.auto_mix_bits
    if auto is None:
        return
    shapes = quantized_shapes(adapter, set())
    weights = sum(o * i for o, i in shapes)
    wargs = QuantArgs.from_cfg(config.quant.weight)
    lo, hi = (sum(planned_bits(replace(wargs, bit=b), o, i) for o, i in shapes) / weights
              for b in (auto.options[0], auto.options[-1]))
    if not lo <= auto.avg_bits <= hi:
        raise ConfigError("quant.auto_mix_bits.avg_bits", f"{auto.avg_bits}: with options {auto.options} this model's "
                          f"quantized linears cost from {lo:.3f} (all {auto.options[0]}-bit) to {hi:.3f} bits per "
                          f"weight (all {auto.options[-1]}-bit), scales and zero points included")


def quantized_shapes(adapter, ignored: set[str]) -> list[tuple[int, int]]:
    """(out_features, in_features) of every decoder linear that is quantized."""
    shapes = []
    for b, block in enumerate(adapter.block_list()):
        for name in adapter.block_linear_names(b):
            if f"{adapter.block_name(b)}.{name}" not in ignored:
                m = block.get_submodule(name)
                shapes.append((m.out_features, m.in_features))
    return shapes
