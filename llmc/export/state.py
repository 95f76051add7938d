"""Algorithm state that crosses stages (AWQ scales and clips → OmniQuant): tensors keyed by full module
name in a safetensors file, with a header naming the method, the quantization settings and a fingerprint
of the architecture and shapes (not the weights: a later stage loads it onto a transformed model)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmc.errors import UserError

FORMAT = "llmc-state/1"


def architecture_fingerprint(model) -> str:
    """Hash of model_type and every 2-D weight's name and shape."""
    h = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, p in model.named_parameters():
        if p.dim() == 2:
            h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def state_file(path: str | os.PathLike, kind: str) -> Path:
    """`path` may name a file or a folder (LLMC configs use one folder for scales and clips)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    return path / f"{kind}.safetensors"


def save_state(path, kind: str, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    target = state_file(path, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    meta = {"format": FORMAT, "kind": kind, **{k: json.dumps(v) for k, v in header.items()}}
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, target)
    return target


def load_state(path, kind: str, model=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header; refuses a file of another kind or for another architecture."""
    target = state_file(path, kind)
    if not target.is_file():
        raise UserError(f"no {kind} state at {target} (was the earlier stage run with save_{kind[:-1]}: True?)")
    with safe_open(str(target), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise UserError(f"{target} is not an llmc {kind} file")
    header = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "kind")}
    if model is not None and header.get("fingerprint") != architecture_fingerprint(model):
        raise UserError(f"{target} was saved for another model (architecture fingerprint "
                        f"{header.get('fingerprint')} != {architecture_fingerprint(model)}: different family or shapes)")
    return tensors, header
