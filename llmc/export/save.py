"""Float checkpoints loadable by transformers: the transformed model (`transformed_model/`) and the
fake-quantized one (`fake_quant_model/`), the latter with a record of its activation quantizers so
`load_fake_quant` restores them."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmc.export.atomic import atomic_dir
from llmc.models.adapter import get_module, set_module
from llmc.quant.fake_linear import QuantLinear, quant_linears
from llmc.quant.hadamard import install_record, rotation_record
from llmc.quant.quantizer import QuantArgs

ACT_RECORD = "llmc_quant.json"
ACT_SCALES = "llmc_act_scales.safetensors"
ROTATIONS = "llmc_rotations.json"  # QuaRot's online Hadamards, which the folded weights need at inference


def write_rotation_record(model: nn.Module, folder: Path) -> None:
    record = rotation_record(model)
    if record:
        (folder / ROTATIONS).write_text(json.dumps({"format": "llmc-online-rotations/1", "layers": record}, indent=2))


def read_rotation_record(folder: str | Path) -> dict[str, dict]:
    """{module name: online Hadamard spec} recorded in a saved folder ({} when none)."""
    path = Path(folder) / ROTATIONS
    return json.loads(path.read_text())["layers"] if path.is_file() else {}


def install_recorded_rotations(model: nn.Module, folder: str | Path) -> int:
    """Re-attach the online rotations a saved folder records; returns how many."""
    record = read_rotation_record(folder)
    install_record(model, record)
    return len(record)


@contextmanager
def plain_linears(model: nn.Module, fake: bool) -> Iterator[list[tuple[str, QuantLinear]]]:
    """Temporarily swap every QuantLinear for an nn.Linear with the float or fake-quantized weight."""
    swapped = list(quant_linears(model))
    for name, q in swapped:
        set_module(model, name, q.to_linear(fake))
    try:
        yield swapped
    finally:
        for name, q in swapped:
            set_module(model, name, q)


def _save_hf(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_transformed(model, tokenizer, path: str | Path) -> None:
    with atomic_dir(path) as tmp, plain_linears(model, fake=False):
        _save_hf(model, tokenizer, tmp)
        write_rotation_record(model, tmp)


def save_fake_quant(model, tokenizer, path: str | Path, kvcache: dict | None = None,
                    kv_scales: dict | None = None) -> None:
    """`kvcache`: the quant.kvcache section, recorded so `load_fake_quant` quantizes the KV cache too;
    `kv_scales`: its static ranges by attention module (llmc/quant/kv_static.py)."""
    with atomic_dir(path) as tmp, plain_linears(model, fake=True) as swapped:
        _save_hf(model, tokenizer, tmp)
        write_rotation_record(model, tmp)
        record, scales = {}, dict(kv_scales or {})
        _record_acts(swapped, "", record, scales)
        _write_act_record(tmp, record, scales, kvcache)


def _record_acts(swapped: list[tuple[str, QuantLinear]], prefix: str, record: dict, scales: dict) -> None:
    for name, q in swapped:
        name = prefix + name
        entry = {"weight": q.wargs.describe() if q.wargs else None}
        if q.act_quant is not None:
            entry["act"] = asdict(q.act_quant.args)
            if q.act_quant.args.static:
                scales[f"{name}.scale"] = q.act_quant.scale.contiguous().cpu()
                scales[f"{name}.zero"] = q.act_quant.zero.contiguous().cpu()
        if q.a_float_cols is not None:  # QUIK: features the act quantizer skips
            entry["act_float_cols"] = q.a_float_cols.tolist()
        if q.outlier_threshold is not None:  # LLM.int8(): float weight saved, quantized per input on load
            entry["outlier_threshold"] = q.outlier_threshold
            entry["weight_args"] = asdict(q.wargs) if q.wargs else None
        record[name] = entry


def _write_act_record(folder: Path, record: dict, scales: dict, kvcache: dict | None = None) -> None:
    (folder / ACT_RECORD).write_text(json.dumps({"format": "llmc-fake-quant/1", "layers": record,
                                                 "kvcache": kvcache}, indent=2))
    if scales:
        save_file(scales, str(folder / ACT_SCALES))


def save_streamed(model, tokenizer, path: str | Path, blocks: nn.ModuleList, block_names: list[str], ctx,
                  fake: bool, kvcache: dict | None = None, kv_scales: dict | None = None) -> None:
    """save_transformed (fake=False) or save_fake_quant (fake=True) for a model whose blocks stream from
    disk: one safetensors shard per block, loaded, written and released in turn, then one for the rest."""
    with atomic_dir(path) as tmp:
        files: dict[str, str] = {}
        record, scales = {}, dict(kv_scales or {})
        n = len(blocks) + 1
        total = 0

        def shard(i: int, state: dict[str, torch.Tensor]) -> None:
            nonlocal total
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / fname),
                      metadata={"format": "pt"})
            files.update({k: fname for k in state})
            total += sum(v.numel() * v.element_size() for v in state.values())

        for i, name in enumerate(block_names):
            block = ctx.onload(blocks[i])
            with plain_linears(block, fake) as swapped:
                shard(i, {f"{name}.{k}": v for k, v in block.state_dict().items()})
                if fake:
                    _record_acts(swapped, f"{name}.", record, scales)
            blocks[i] = ctx.offload(block)
        inside = tuple(f"{name}." for name in block_names)
        rest, seen = {}, set()
        for k, v in model.state_dict(keep_vars=True).items():
            if k.startswith(inside) or id(v) in seen:  # a tied weight is stored once, as save_pretrained does
                continue
            seen.add(id(v))
            rest[k] = v
        shard(len(blocks), rest)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if fake:
            _write_act_record(tmp, record, scales, kvcache)


def load_fake_quant(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a `fake_quant_model/` folder: weights are already on their grid (LLM.int8()'s are float and
    re-quantized per input); online rotations (QuaRot), activation quantizers (with QUIK's float features)
    and the KV-cache quantization are re-installed from the records so the model
    computes what it computed in memory."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    from llmc.models.adapter import prepare_model

    # unfused experts (MoE), so records that name one expert's linear find it
    model = prepare_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    install_recorded_rotations(model, path)  # before the act quantizers, which run after them
    saved = json.loads((path / ACT_RECORD).read_text()) if (path / ACT_RECORD).exists() else {}
    record = saved.get("layers", {})
    scales = load_file(str(path / ACT_SCALES)) if (path / ACT_SCALES).exists() else {}
    if saved.get("kvcache"):
        from llmc.config.schema import KVCacheCfg
        from llmc.models.adapter import adapter_class
        from llmc.quant.kv_static import install_static
        from llmc.quant.kvcache import enable_kv_quant

        adapter = adapter_class(model.config.model_type, None)(model)
        cfg = KVCacheCfg(**saved["kvcache"])
        if cfg.static:
            install_static(adapter, scales)
        enable_kv_quant(model, adapter.attention_modules(), cfg)
    for name, entry in record.items():
        threshold = entry.get("outlier_threshold")
        if not entry.get("act") and threshold is None:
            continue
        wargs = QuantArgs(**entry["weight_args"]) if threshold is not None and entry.get("weight_args") else None
        q = QuantLinear(get_module(model, name), wargs, QuantArgs(**entry["act"]) if entry.get("act") else None)
        q.outlier_threshold = threshold
        if entry.get("act_float_cols"):
            q.set_act_float_cols(torch.tensor(entry["act_float_cols"]))
        if q.act_quant is not None and q.act_quant.args.static:
            q.act_quant.scale, q.act_quant.zero = scales[f"{name}.scale"], scales[f"{name}.zero"]
        set_module(model, name, q)
    return model
