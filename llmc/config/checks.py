"""Checks that need the registries or the model's shapes; all run before any weight is loaded."""
from __future__ import annotations

import os

from pydantic import ValidationError

from llmc.config.loader import format_validation_error
from llmc.config.schema import PACKED_SAVES, Config
from llmc.errors import ConfigError
from llmc.registry import ALGORITHMS, DATASETS, PREPROCESSORS

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_block")
# Methods whose weights come from the quantizer's own calibration of each (possibly transformed) weight,
# so per_block tiles and bit 48's two levels apply unchanged; the others compute grids of their own.
BLOCK_METHODS = ("RTN",)
TWO_LEVEL_METHODS = ("RTN",)
ACT_GRANULARITIES = ("per_tensor", "per_token", "per_head", "per_group")
ACT_CALIB_STATIC = ("minmax", "percentile", "static_hist")


def algorithm_options(config: Config):
    """The chosen algorithm class and its validated `quant.special` options."""
    import llmc.algorithms  # noqa: F401  (registration)

    cls = ALGORITHMS.get(config.quant.method, "quant.method")
    try:
        options = cls.Options.model_validate(config.quant.special)
    except ValidationError as err:
        text = format_validation_error(err, root=cls.Options)
        text = "\n".join(f"quant.special.{line}" for line in text.splitlines())
        raise ConfigError("", f"invalid options for {cls.name}:\n{text}") from None
    return cls, options


def _check_path(key: str, path, download: bool) -> None:
    if download:
        return
    if not path:
        raise ConfigError(key, "is required when download is False (a local file or saved dataset folder)")
    if not os.path.exists(path):
        raise ConfigError(key, f"'{path}' does not exist")


def check_config(config: Config) -> None:
    """Every stage's quant section, then the data sections."""
    if config.tune is not None:  # every candidate is checked as a run of its own
        from llmc import tune

        return tune.check(config)
    _check_offload(config)
    from llmc.evaluation import opencompass

    opencompass.check(config)
    from llmc.evaluation import packed

    packed.check(config)
    for stage in config.stage_configs():
        check_packing(stage)
    from llmc.algorithms.quarot import check_online_rotate

    check_online_rotate(config)
    from llmc.quant.kv_static import check_kv

    check_kv(config)
    produced: set[str] = set()
    for i, stage in enumerate(config.stage_configs()):
        try:
            produced |= check_quant(stage, produced)
        except ConfigError as err:
            if not config.stages:
                raise
            key = err.key.replace("quant", f"stages.{i}", 1) if err.key.startswith("quant") else err.key
            raise ConfigError(key, str(err)[len(err.key) + 2:] if err.key else str(err)) from None


def check_quant(config: Config, available: set[str] = frozenset()) -> set[str]:
    """Checks of one quant section; returns the state kinds its algorithm hands to later stages."""
    import llmc.data  # noqa: F401  (registration)

    q = config.quant
    if q.weight is None and q.act is None:
        raise ConfigError("quant", "needs a weight and/or an act section: nothing would be quantized")
    if q.weight is not None:
        if q.weight.granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError("quant.weight.granularity", f"'{q.weight.granularity}' is for activations; "
                              f"weights take one of {', '.join(WEIGHT_GRANULARITIES)}")
        if q.weight.static:
            raise ConfigError("quant.weight.static", "only activations have static/dynamic ranges")
    if q.act is not None:
        if q.act.bit == 48 or q.act.w_1 is not None:
            raise ConfigError("quant.act.bit" if q.act.bit == 48 else "quant.act.w_1", "two-level grids (bit 48, "
                              "DGQ's w_1/w_2) are weight schemes; quantize activations with bit 8 or e4m3")
        if q.act.granularity not in ACT_GRANULARITIES:
            raise ConfigError("quant.act.granularity", f"'{q.act.granularity}' is not an activation granularity; "
                              f"use one of {', '.join(ACT_GRANULARITIES)}")
        if q.act.static and config.calib is None:
            raise ConfigError("quant.act.static", "static activation ranges need a calib section")
        if q.act.static and q.act.granularity != "per_tensor":
            raise ConfigError("quant.act.granularity", f"'{q.act.granularity}' with static: True; static "
                              "activation ranges are calibrated per_tensor (dynamic ones may be per_token/per_head)")
        if q.act.calib_algo == "static_hist" and q.act.static and (not q.act.symmetric or q.act.quant_type != "int-quant"):
            raise ConfigError("quant.act.calib_algo", f"static_hist with symmetric {q.act.symmetric}, bit {q.act.bit}: "
                              "LLMC's histogram search sets symmetric per-tensor integer ranges; set symmetric: True "
                              "and an integer bit, or calib_algo: minmax")
        if q.act.clip_ratio != 1 and q.act.calib_algo != "minmax":
            raise ConfigError("quant.act.clip_ratio", f"{q.act.clip_ratio} with calib_algo {q.act.calib_algo}; "
                              "it scales minmax ranges (calib_algo: minmax), the other algorithms set their own")
        allowed = ACT_CALIB_STATIC if q.act.static else ("minmax",)
        if q.act.calib_algo not in allowed:
            raise ConfigError("quant.act.calib_algo", f"'{q.act.calib_algo}' with static: {q.act.static}; "
                              f"expected one of {', '.join(allowed)}"
                              + ("" if q.act.static else " (dynamic ranges come from each input's own min/max)"))
    if q.weight is not None and q.weight.clip_ratio != 1:
        raise ConfigError("quant.weight.clip_ratio", f"{q.weight.clip_ratio}: clip_ratio scales activation ranges; "
                          "weights search their clip with calib_algo: mse (maxshrink, mse_grid) or learn it (OmniQuant)")
    cls, options = algorithm_options(config)
    _check_schemes(config, cls)
    learned = cls.needs_targets  # trains against the float block's outputs through the rounding
    for section in ("weight", "act"):
        spec = getattr(q, section)
        if spec is None or spec.ste is None or spec.ste == learned:
            continue
        raise ConfigError(f"quant.{section}.ste", f"{spec.ste} with {cls.name}: " + (
            f"{cls.name} learns through the rounding and always uses straight-through gradients; remove ste"
            if learned else f"{cls.name} computes no gradients, so straight-through rounding has no effect; "
            "remove ste (it applies to learned methods such as OmniQuant)"))
    if learned and q.weight is not None and (q.weight.quant_type in ("nvfp4", "mxfp4", "nf4") or q.weight.bit == "e2m1"):
        raise ConfigError("quant.weight.quant_type", f"{q.weight.quant_type} (bit {q.weight.bit}) with {cls.name}: its "
                          "learned clipping trains through integer or fp8 rounding only; use RTN, GPTQ or AWQ")
    if q.weight is not None and q.weight.calib_algo not in ("minmax", "mse") + cls.weight_calib_algos:
        raise ConfigError("quant.weight.calib_algo", f"'{q.weight.calib_algo}' is not available with {cls.name}; "
                          f"expected one of {', '.join(('minmax', 'mse') + cls.weight_calib_algos)}")
    cls.check(config)
    from llmc.config.mix_bits import check_mix_bits

    check_mix_bits(config, cls)
    from llmc.config.auto_mix_bits import check_auto_mix_bits

    check_auto_mix_bits(config, cls)
    from llmc.export.state import state_file

    for kind, path in options.inputs().items():
        if kind in available:  # an earlier stage of this run hands it over in memory
            continue
        key = "clip_path" if kind == "clips" else "scale_path"
        if not path:
            raise ConfigError(f"quant.special.{key}", f"starting from saved {kind} needs {key} (or an earlier "
                              f"stage in `stages` that finds {kind})")
        if not state_file(path, kind).is_file():
            raise ConfigError(f"quant.special.{key}", f"no saved {kind} at '{state_file(path, kind)}' (run the "
                              f"earlier stage with save_{kind[:-1]}: True and {key} pointing here)")
    needs_calib = cls.needs_calibration(*_args(config), options)
    if needs_calib and config.calib is None:
        raise ConfigError("calib", f"{cls.name} with these settings needs calibration data: add a calib section")
    if config.calib is not None:
        DATASETS.get(config.calib.name, "calib.name")
        if config.calib.preproc is not None:
            PREPROCESSORS.get(config.calib.preproc, "calib.preproc")
        _check_path("calib.path", config.calib.path, config.calib.download)
        from llmc.data.calib import check_calib

        check_calib(config.calib)
    for i, ev in enumerate(config.eval):
        prefix = "eval" if len(config.eval) == 1 else f"eval.{i}"
        if ev.type == "lm_eval":
            from llmc.evaluation.lm_eval import check_section

            check_section(ev, prefix)
            continue
        from llmc.evaluation.sections import check_section as check_eval

        check_eval(ev, prefix)
    return cls.produces(options)


def _check_schemes(config: Config, cls) -> None:
    """per_block, bit 48 and DGQ's w_1/w_2 only with the methods that compute them."""
    w = config.quant.weight
    if w is None:
        return
    if w.granularity == "per_block" and cls.name not in BLOCK_METHODS:
        raise ConfigError("quant.weight.granularity", f"per_block with {cls.name}: block-wise tiles are computed by "
                          f"{', '.join(BLOCK_METHODS)} (LLMC's per_block configs are RTN); use per_channel/per_group")
    if w.bit == 48 and cls.name not in TWO_LEVEL_METHODS:
        raise ConfigError("quant.weight.bit", f"48 with {cls.name}: the two-level W4A8 grid is computed by "
                          f"{', '.join(TWO_LEVEL_METHODS)} (LLMC's bit-48 configs); DGQ searches its own (quant.method: "
                          "DGQ with weight.w_1/w_2)")
    if w.w_1 is not None and cls.name != "DGQ":
        raise ConfigError("quant.weight.w_1", f"w_1/w_2 are DGQ's two weight levels; quant.method is {cls.name} "
                          "(set quant.method: DGQ, or give the weight quantizer's keys directly)")
    two_level = w.bit == 48 or w.w_1 is not None
    if two_level and config.quant.quantize_gates:
        raise ConfigError("quant.quantize_gates", "routers are round-to-nearest quantized with one grid; the "
                          "two-level weights (bit 48 / DGQ) have none to lend them: remove quantize_gates")


def check_packing(config: Config) -> None:
    """LLMC's need_pack / pack_version choose how an export packs weights: each must name a packing an
    export of this run writes (else it would change nothing)."""
    q, save = config.quant, config.save
    if q.act is not None and (q.act.need_pack is not None or q.act.pack_version is not None):
        raise ConfigError("quant.act.need_pack" if q.act.need_pack is not None else "quant.act.pack_version",
                          "packing applies to weights; move it to quant.weight")
    w = q.weight
    if w is None:
        return
    ct = [k for k in ("save_vllm", "save_sgl", "save_lightllm") if getattr(save, k)]
    if w.need_pack is not None:
        if not ct:
            raise ConfigError("quant.weight.need_pack", f"{w.need_pack}: packing is what save_vllm/save_sgl/"
                              "save_lightllm (compressed-tensors) write; none is set, so remove need_pack or set one")
        if w.need_pack and isinstance(w.bit, str):
            raise ConfigError("quant.weight.need_pack", f"True with bit {w.bit}: fp8 weights are written "
                              "float-quantized (one byte each), not packed; remove need_pack")
        if w.need_pack and q.act is not None:
            raise ConfigError("quant.weight.need_pack", f"True with an act section: {'/'.join(ct)} write "
                              "weight-activation models int-quantized (int8 weights unpacked); remove need_pack")
        if not w.need_pack and q.act is None:
            raise ConfigError("quant.weight.need_pack", f"False: {'/'.join(ct)} write weight-only models "
                              "pack-quantized (int32-packed), the format vLLM and SGLang load; set need_pack: True")
    if w.pack_version is not None:
        if not (save.save_autoawq or save.save_mlcllm):
            raise ConfigError("quant.weight.pack_version", f"{w.pack_version}: the AutoAWQ packing, which only "
                              "save_autoawq/save_mlcllm write; set save.save_autoawq: True or remove pack_version")
        if w.pack_version != "gemm_pack":
            raise ConfigError("quant.weight.pack_version", f"{w.pack_version}: save_autoawq writes the GEMM "
                              "layout (gemm_pack), which AutoAWQ, transformers and vLLM load; set gemm_pack")


def _check_offload(config: Config) -> None:
    """What streaming blocks from disk does not cover yet is refused before any work."""
    mode = config.model.offload
    if mode == "none":
        return
    if config.stages:
        raise ConfigError("model.offload", f"{mode}: `stages` (several algorithms in one process) need the whole "
                          "model in memory between stages; run the stages as separate configs with save_trans")
    whole = sorted({ev.type for ev in config.eval if ev.type in ("lm_eval", "decode_ppl", "generate_only")})
    if whole:
        raise ConfigError("model.offload", f"{mode}: eval type {'/'.join(whole)} needs the whole model in memory; "
                          "evaluate the saved model separately, or use ppl/token_acc (they run block by block)")
    packed = [k for k in PACKED_SAVES if getattr(config.save, k)]
    if packed:
        raise ConfigError("model.offload", f"{mode}: {'/'.join(packed)} do not stream yet; save_fake or save_trans "
                          "stream block by block, and the packed export can be made from the fake-quant model")


def _args(config: Config):
    from llmc.quant.quantizer import QuantArgs

    return QuantArgs.from_cfg(config.quant.weight), QuantArgs.from_cfg(config.quant.act)


def check_against_model(config: Config, adapter) -> None:
    """Shape checks on the (meta-device) model: weight group sizes and activation head counts must divide
    every quantized linear's in_features."""
    from llmc.models.load import fp8_source_kwargs

    fp8_source_kwargs(config.model, adapter.model.config)  # an FP8-stored checkpoint matches torch_dtype
    if config.model.torch_dtype == "float8_e4m3fn" and config.model.offload != "none":
        raise ConfigError("model.offload", f"{config.model.offload} with an FP8-stored checkpoint: streamed blocks are "
                          "read from the shards as stored; dequantize it first or set offload: none")
    w, a = config.quant.weight, config.quant.act
    checks = []
    if w is not None and w.granularity == "per_group":
        checks.append(("quant.weight.group_size", w.group_size, "choose a divisor"))
    if w is not None and w.granularity == "per_block":
        checks.append(("quant.weight.block_size", w.block_size, "tiles span whole columns; choose a divisor"))
    for name, part in (("bit4", w and w.bit4), ("w_1", w and w.w_1)):
        if part is not None and part.granularity == "per_group":
            checks.append((f"quant.weight.{name}.group_size", part.group_size, "choose a divisor"))
    if a is not None and a.granularity == "per_group":
        checks.append(("quant.act.group_size", a.group_size, "choose a divisor"))
    if a is not None and a.granularity == "per_head":
        checks.append(("quant.act.head_num", a.head_num, "per_head splits each activation into head_num equal "
                       "heads; choose a head count that divides it"))
    for key, size, what in checks:
        for i, block in enumerate(adapter.block_list()):
            for name in adapter.block_linear_names(i):
                width = block.get_submodule(name).in_features
                if width % size:
                    hint = f" (e.g. {_divisor_hint(width)})" if key.endswith("group_size") else ""
                    raise ConfigError(key, f"{size} does not divide in_features {width} of "
                                      f"{adapter.block_name(i)}.{name}; {what}{hint}")
    _check_gates(config, adapter)
    from llmc.quant.kv_static import check_kv_model

    check_kv_model(config, adapter)
    algorithm_options(config)[0].check_model(config, adapter)
    from llmc.config.mix_bits import check_mix_bits_model

    check_mix_bits_model(config, adapter)
    from llmc.config.auto_mix_bits import check_auto_mix_bits_model

    check_auto_mix_bits_model(config, adapter)


def _check_gates(config: Config, adapter) -> None:
    """quant.quantize_gates names float readers (routers, shared-expert gates) the model declares."""
    wanted = config.quant.quantize_gates
    if not wanted:
        return
    readers = {r for i in range(len(adapter.block_list())) for s in adapter.block_subsets(i) for r in s.readers}
    unknown = sorted(set(wanted) - readers)
    if unknown:
        raise ConfigError("quant.quantize_gates", f"{unknown}: not a router or gate of this model (its float "
                          f"readers: {sorted(readers) or 'none, it has no experts'})")
    if config.quant.weight is None:
        raise ConfigError("quant.quantize_gates", "quantizes routers with the weight quantizer: a weight section is required")


def _divisor_hint(n: int) -> str:
    return ", ".join(str(g) for g in (32, 64, 128, 256) if n % g == 0) or "per_channel"
