"""`--dry-run`: the plan of a run from the config and the checkpoint's config alone (no weights loaded):
blocks, subsets and the linears each quantizes, ignored layers, bits and groups, calibration tensor
sizes and a rough peak-memory estimate."""
from __future__ import annotations

from llmc.config.checks import algorithm_options, check_against_model
from llmc.config.handoff import check_clip_handoff
from llmc.config.schema import Config
from llmc.export.packing import packed_exports
from llmc.models import adapter_class, load_hf_config, meta_model, resolve_source

GIB = 1024 ** 3


def _describe(spec) -> str:
    from llmc.quant.quantizer import QuantArgs

    return "float" if spec is None else QuantArgs.from_cfg(spec).describe()


def _describe_kv(kv) -> str:
    text = f"{kv.method} int{kv.bit} {kv.granularity}" + (f" g{kv.group_size}" if kv.granularity == "per_group" else "")
    return text + (" static" if kv.static else "") + (f", float window {kv.window}" if kv.method == "Kivi" else "")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.1f} MiB"


def _mix_bits_lines(stage: Config, adapter) -> list[str]:
    """The linears each quant.mix_bits setting takes, grouped by the quantizer they end up with."""
    if not stage.quant.mix_bits:
        return []
    from llmc.config.mix_bits import resolve

    floats, args = resolve(stage.quant, adapter)
    groups: dict[str, list[str]] = {}
    for name, (w, a) in args.items():
        groups.setdefault(w.describe() + (f", act {a.describe()}" if a is not None else ""), []).append(name)
    if floats:
        groups["float"] = sorted(floats)
    return [f"  mix_bits: {len(names)} linears {what}: {', '.join(names[:4])}" + (" ..." if len(names) > 4 else "")
            for what, names in groups.items()]


def plan(config: Config, ignored_names) -> str:
    hf_config = load_hf_config(resolve_source(config.model.path, config.model.gguf_file))
    adapter = adapter_class(getattr(hf_config, "model_type", None), config.model.type)(meta_model(hf_config))
    if config.tune:  # the candidates that fit the model, each checked against the packed formats
        from llmc import tune

        stages = tune.prepare(config, tune.candidates(config), adapter, 1, False)
        exports = tune.exports(stages, hf_config)
    else:
        stages = config.stage_configs()
        for stage in stages:
            check_against_model(stage, adapter)
        check_clip_handoff(stages, adapter)
        exports = packed_exports(config, hf_config)  # refused here as the run refuses them, before any weight
    ignored = ignored_names(config, adapter)
    blocks = adapter.block_list()
    hidden = hf_config.hidden_size
    lines = [f"model: {config.model.path} ({hf_config.model_type}, {len(blocks)} blocks, hidden {hidden})"]
    for i, stage in enumerate(stages):
        cls, _ = algorithm_options(stage)
        lines.append(f"{'tune candidate' if config.tune else 'stage'} {i}: {cls.name}: weights {_describe(stage.quant.weight)}, "
                     f"activations {_describe(stage.quant.act)}"
                     + (f", kv cache {_describe_kv(stage.quant.kvcache)}" if stage.quant.kvcache else "")
                     + f", quant_out {cls.quant_out(stage.quant)}")
        lines += _mix_bits_lines(stage, adapter)
        auto = stage.quant.auto_mix_bits
        if auto is not None:
            lines.append(f"  auto_mix_bits: each linear {' or '.join(map(str, auto.options))} bits, {auto.avg_bits} "
                         f"bits per weight on average, chosen per block on {auto.n_samples or 'all'} calibration "
                         "samples")
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    layouts: dict[tuple, list[int]] = {}  # blocks with the same subsets (MoE models mix dense and expert blocks)
    for i in range(len(blocks)):
        layouts.setdefault(tuple(adapter.block_subsets(i)), []).append(i)
    for subsets, ids in layouts.items():
        which = "each block" if len(layouts) == 1 else f"blocks {', '.join(map(str, ids))}"
        lines.append(f"{which}: {sum(p.numel() for p in blocks[ids[0]].parameters()) / 1e6:.1f} M parameters; subsets:")
        for s in subsets:
            lines.append(f"  {', '.join(s.layers)}  <- prev_op {s.prev_op}, loss on {s.inspect or 'the block'}"
                         + (f"; float readers {', '.join(s.readers)}" if s.readers else ""))
    if exports:
        lines.append("packed exports: " + ", ".join(f"{f.key} -> {f.folder}/" for f in exports))
    lines.append(f"ignored (float) linears: {len(ignored)}" + (f": {', '.join(sorted(ignored)[:8])}"
                                                             + (" ..." if len(ignored) > 8 else "") if ignored else ""))
    total = sum(p.numel() for p in adapter.model.parameters())
    bytes_per = 4  # float32 on CPU, the dtype statistics use
    lines.append(f"model: {total / 1e6:.1f} M parameters, {total * bytes_per / GIB:.2f} GiB in float32")
    calib = config.calib
    act = 0
    if calib is not None:
        tokens = calib.n_samples * calib.seq_len
        act = tokens * hidden * bytes_per
        lines.append(f"calibration: {calib.n_samples} x {calib.seq_len} tokens in batches of "
                     f"{calib.n_samples if calib.bs == -1 else calib.bs}; one block-input copy "
                     f"{act / GIB:.2f} GiB (inputs, outputs and captured subset inputs keep a few)")
    widest = max(getattr(hf_config, "intermediate_size", hidden), hidden)
    captured = act * (2 + 2 * widest / hidden) if act else 0  # streams + the widest captured subset inputs
    runtime = 1.0 * GIB  # python, torch and transformers themselves (measured ~1 GiB on CPU)
    resident = total
    if config.model.offload != "none":  # blocks stream from disk: only one is resident (and the rest)
        resident = total - sum(p.numel() for p in blocks.parameters()) + block_params
        lines.append(f"model.offload {config.model.offload}: decoder blocks stream from disk, one resident at a time"
                     + (" (auto: decided at load time from the RAM available)" if config.model.offload == "auto" else ""))
    estimate = resident * bytes_per + captured + runtime
    lines.append(f"estimated peak memory: {estimate / GIB:.2f} GiB (weights {_size(resident * bytes_per)} + "
                 f"activations {_size(captured)} + runtime ~1 GiB)")
    return "\n".join(lines)
