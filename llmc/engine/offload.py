"""Models larger than memory (`model.offload: disk`): decoder blocks live on the meta device and only the
block being worked on holds real tensors.

A block's tensors come from the model's own safetensors shards until the block is finished; then they
are written to a file of the run's own and read from there. Only tensors move: the module objects (and
the flags algorithms and evaluation set on them) stay in memory, a few kilobytes per block.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_module_tensor_to_device
from loguru import logger
from safetensors import safe_open
from torch import nn

NAME_ATTR = "_llmc_block_name"
FOLDER = ".llmc_offload"  # beside the outputs: finished blocks while the run lasts


def weight_map(folder: str | Path) -> dict[str, Path]:
    """Tensor name → safetensors file of an HF checkpoint folder (sharded or single-file)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    return {}


def checkpoint_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in set(weight_map(folder).values()))


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters())


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by dotted name."""
    out = {n: p for n, p in module.named_parameters()}
    out.update({n: b for n, b in module.named_buffers() if b is not None})
    return out


def to_meta(module: nn.Module) -> None:
    for name in tensors_of(module):
        set_module_tensor_to_device(module, name, "meta")
    for m in module.modules():
        if hasattr(m, "drop_cache"):
            m.drop_cache()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache  # find_library runs ldconfig: once per process, not once per block
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory_to_the_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation over `threshold` bytes by its own mmap, and trim the heap above it.

    glibc raises its mmap threshold to the size of each large block it frees (up to 32 MiB), so the
    tensors of one streamed block are later carved from the heap, and the heap keeps the peak of every
    block it has seen: on bench/offload.py's 1B model, 1.9 GB peak RSS where 1.1 GB is live.
    A fixed threshold gives each block's memory back when the block is released. False where the C
    library is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))


def trim_heap() -> None:
    """Give the OS the free pages inside the heap too, not only above it. Tokenizing the calibration
    text leaves about 180 MB of small freed allocations that the trim threshold never reaches."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class BlockStore:
    """Where each decoder block's tensors live while it is not on the compute device."""

    def __init__(self, source: str | Path, folder: Path, renames: tuple[tuple[str, str], ...] = ()):
        self.source = weight_map(source)
        self.renames = renames  # (module name part, checkpoint name part): Mixtral's mlp is block_sparse_moe on disk
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's leftovers
        self.finished: dict[str, Path] = {}
        self.loads = 0  # for tests and logs
        if not return_freed_memory_to_the_os():
            logger.info("offload: not glibc, freed blocks may stay in the process's heap")

    @staticmethod
    def holds(module: nn.Module) -> bool:
        return getattr(module, NAME_ATTR, None) is not None

    def load(self, module: nn.Module, device: torch.device) -> nn.Module:
        """Fill the block's tensors in place: from its finished file, else from the model's shards."""
        if not is_meta(module):
            return module.to(device)
        name = getattr(module, NAME_ATTR)
        self.loads += 1
        trim_heap()  # before the block arrives: what earlier steps freed goes back first
        if name in self.finished:
            saved = torch.load(self.finished[name], map_location="cpu", weights_only=True)
            for key, value in saved.items():
                set_module_tensor_to_device(module, key, device, value=value)
            return module
        # meta tensors, and real buffers the checkpoint stores too (built real by the empty-weights load:
        # DeepSeek's routing bias e_score_correction_bias would otherwise keep its initial zeros)
        wanted = tensors_of(module)
        by_file: dict[Path, list[str]] = {}
        stored = {}
        for key, t in list(wanted.items()):
            full = f"{name}.{key}"
            for ours, theirs in self.renames:
                full = full if full in self.source else full.replace(ours, theirs)
            if full not in self.source and not t.is_meta:
                del wanted[key]
                continue
            if full not in self.source:
                raise RuntimeError(f"offload: '{name}.{key}' is not in the checkpoint's safetensors files")
            stored[key] = full
            by_file.setdefault(self.source[full], []).append(key)
        for file, keys in by_file.items():
            with safe_open(str(file), "pt") as f:
                for key in keys:
                    value = f.get_tensor(stored[key]).to(wanted[key].dtype)
                    set_module_tensor_to_device(module, key, device, value=value)
        return module

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.name == FOLDER and not any(self.folder.parent.iterdir()):
            self.folder.parent.rmdir()

    def store(self, module: nn.Module, changed: bool) -> nn.Module:
        """Release the block's tensors, writing them first if the block changed since it was read."""
        if is_meta(module):
            return module
        if changed:
            name = getattr(module, NAME_ATTR)
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{name}.pt"
            tmp = self.folder / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
            torch.save({k: t.detach().cpu() for k, t in tensors_of(module).items()}, tmp)
            os.replace(tmp, path)
            self.finished[name] = path
        to_meta(module)
        return module


def tag_blocks(blocks: nn.ModuleList, names: list[str]) -> None:
    for block, name in zip(blocks, names):
        setattr(block, NAME_ATTR, name)


def wants_offload(mode: str, source_folder: Optional[str]) -> bool:
    """`disk`: always; `auto`: when the checkpoint is larger than the RAM available now (logged)."""
    if mode == "disk":
        return True
    if mode != "auto" or source_folder is None:
        return False
    size, free = checkpoint_bytes(source_folder), available_ram_bytes()
    if size > 0.8 * free:
        logger.info(f"model.offload auto: checkpoint {size / 2**30:.1f} GiB, {free / 2**30:.1f} GiB RAM available: "
                    "blocks stream from disk")
        return True
    return False
