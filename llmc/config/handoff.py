"""Clips handed from one stage to a later one (AWQ -> TesseraQ, AWQ -> OmniQuant) hold one range per weight
group of the grid they were searched on: a stage that quantizes a linear on another grouping cannot start
from them. Checked on the meta model before any weight loads, for clips passed in memory (the earlier
stage's grids, mix_bits included) and for clip files (their tensors' shapes, read without their data)."""
from __future__ import annotations

from math import prod
from typing import Optional

from safetensors import safe_open

from llmc.config import mix_bits
from llmc.errors import ConfigError

KIND = "clips"


def pairs(args, rows: int, cols: int) -> Optional[int]:
    """How many (scale, zero) pairs the grid `args` gives a [rows, cols] weight (None: not a weight grid)."""
    if args is None:
        return None
    if args.granularity == "per_group":
        return rows * cols // args.group_size
    return {"per_channel": rows, "per_tensor": 1}.get(args.granularity)


def grid_pairs(stage, adapter, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Full linear name -> pairs on the stage's grid for that linear (mix_bits settings win; float ones and
    `skip` absent)."""
    from llmc.quant.quantizer import QuantArgs

    floats, per_linear = mix_bits.resolve(stage.quant, adapter)
    default = QuantArgs.from_cfg(stage.quant.weight)
    out = {}
    for b, block in enumerate(adapter.block_list()):
        for name in adapter.block_linear_names(b):
            full = f"{adapter.block_name(b)}.{name}"
            if full in floats or name in skip:
                continue
            linear = block.get_submodule(name)
            n = pairs(per_linear.get(full, (default, None))[0], linear.out_features, linear.in_features)
            if n is not None:
                out[full] = n
    return out


def file_pairs(path) -> dict[str, int]:
    """Full linear name -> values per clip bound in a saved clip file (shapes only)."""
    from llmc.export.state import state_file

    with safe_open(str(state_file(path, KIND)), framework="pt") as f:
        return {k[:-len(".max")]: prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".max")}


def check_clip_handoff(stages: list, adapter) -> None:
    """Every stage that starts from clips finds them on its own grid, linear by linear."""
    from llmc.config.checks import algorithm_options

    found: Optional[tuple[int, dict[str, int]]] = None  # the latest stage that finds clips, its grids
    for j, stage in enumerate(stages):
        algo_cls, options = algorithm_options(stage)
        inputs = options.inputs()
        if KIND in inputs:
            mine = grid_pairs(stage, adapter)
            prefix = f"stages.{j}" if len(stages) > 1 else "quant"
            if found is not None:
                source, theirs = f"stage {found[0]} ({stages[found[0]].quant.method})", found[1]
                key = f"{prefix}.weight"
            else:
                source, theirs = f"the clip file at {inputs[KIND]}", file_pairs(inputs[KIND])
                key = f"{prefix}.special.clip_path"
            for full, n in mine.items():
                if full in theirs and theirs[full] != n:
                    raise ConfigError(key, f"{algo_cls.name} quantizes {full} in {n} weight groups, but {source} "
                                      f"found its clips on {theirs[full]} groups; the clips fit only the "
                                      "grid they were searched on: give both stages the same granularity and "
                                      "group_size (mix_bits settings included)")
        if KIND in algo_cls.produces(options):  # AWQ's clip search leaves the attention-score linears unclipped
            found = (j, grid_pairs(stage, adapter, adapter.score_layers))
