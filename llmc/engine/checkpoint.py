"""Resume: the run's progress, saved after every finished block in `save_path/.llmc_resume/`.

Per stage, each finished block is written as its own file (the block module with its quantized
linears), then a small commit file (the algorithm state found so far, e.g. AWQ scales, and the RNG)
atomically, named by the next block's index: a kill at any moment leaves the previous block's
checkpoint or this one, never half of one. A resumed run replays the finished blocks (restores each
and runs it forward, which rebuilds the next block's inputs exactly), then continues at the next.

`manifest.json` records fingerprints of the validated config, the model and the calibration data;
resuming with any of them different is refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from loguru import logger
from torch import nn

from llmc.errors import UserError
from llmc.export.atomic import atomic_write_json

FOLDER = ".llmc_resume"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_fingerprint(config_dump: dict) -> dict:
    """What decides the quantized weights: everything but where outputs go and how they are evaluated."""
    return {k: v for k, v in _flat(config_dump).items() if not k.startswith(("save.", "eval"))}


def model_fingerprint(model: nn.Module, source_folder: str) -> dict:
    """Architecture (names and shapes) plus the weight files' names and sizes, without reading weights."""
    from llmc.export.state import architecture_fingerprint

    files = {p.name: p.stat().st_size for p in sorted(Path(source_folder).iterdir())
             if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")}
    return {"architecture": architecture_fingerprint(model), "files": files}


def data_fingerprint(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for ids in batches:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _differences(saved: Any, now: Any, what: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now))
        return [f"{what} {k}: {saved.get(k, '(absent)')!r} then, {now.get(k, '(absent)')!r} now"
                for k in keys if saved.get(k) != now.get(k)]
    return [] if saved == now else [f"{what}: {saved!r} then, {now!r} now"]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """Per-block progress of one run; `enabled` False makes every method a no-op (no save_path, or
    checkpointing switched off, or a non-writing rank)."""

    def __init__(self, folder: Optional[Path], keep: bool = False, writer: bool = True):
        self.folder, self.keep, self.writer = folder, keep, writer  # data-parallel: rank 0 writes, all read
        self.manifest: dict = {"fingerprints": {}, "evals": None}
        self.resumable: dict[int, int] = {}  # stage → blocks committed when the run resumed
        self.commits: dict[int, dict] = {}

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    @classmethod
    def open(cls, folder: Optional[Path], resume: bool, keep: bool = False, writer: bool = True) -> "Checkpoint":
        ckpt = cls(folder, keep, writer)
        if folder is None:
            if resume:
                raise UserError("--resume needs save.save_path: the checkpoint lives in save_path/.llmc_resume")
            return ckpt
        manifest = folder / "manifest.json"
        if resume:
            if not manifest.is_file():
                raise UserError(f"--resume: no checkpoint in '{folder}' (nothing to resume; run without --resume)")
            ckpt.manifest = json.loads(manifest.read_text())
            ckpt._read_commits()
            logger.info(f"resuming from the checkpoint in {folder}: " + (", ".join(
                f"stage {s}: {n} blocks" for s, n in sorted(ckpt.resumable.items())) or "no block finished"))
        elif folder.exists() and writer:
            shutil.rmtree(folder)  # a fresh run replaces an old checkpoint (the save_path check came first)
        return ckpt

    # ---- fingerprints ----------------------------------------------------------------------------
    def check(self, what: str, value: Any) -> None:
        """Record `value` for `what`, or, resuming, refuse if it differs from the recorded one."""
        if not self.enabled:
            return
        saved = self.manifest["fingerprints"].get(what)
        if saved is not None and saved != value:
            diffs = _differences(saved, value, what)
            raise UserError(f"--resume: the checkpoint in '{self.folder}' was made with a different {what}:\n  "
                            + "\n  ".join(diffs[:10]) + (f"\n  ... {len(diffs) - 10} more" if len(diffs) > 10 else "")
                            + "\nresume with the same inputs, or start afresh without --resume")
        self.manifest["fingerprints"][what] = value
        if self.writer:
            self._write_manifest()

    # ---- evaluations already done ----------------------------------------------------------------
    def saved_evals(self, eval_dump: Any) -> Optional[list]:
        e = self.manifest.get("evals")
        return e["results"] if e and e["config"] == eval_dump else None

    def save_evals(self, eval_dump: Any, results: list) -> None:
        if self.enabled and self.writer:
            self.manifest["evals"] = {"config": eval_dump, "results": results}
            self._write_manifest()

    # ---- blocks ----------------------------------------------------------------------------------
    def _read_commits(self) -> None:
        """What each stage had committed when the run resumed (read once, so no process sees a commit
        the resumed run itself writes later)."""
        for path in self.folder.glob("stage*-stream-*.pt"):
            stage, count = int(path.name[5:].split("-", 1)[0]), int(path.stem.rsplit("-", 1)[1])
            if count > self.resumable.get(stage, 0):
                self.resumable[stage] = count
        self.commits = {stage: torch.load(self._stream_file(stage, n), map_location="cpu", weights_only=False)
                        for stage, n in self.resumable.items()}

    def finished(self, stage: int) -> int:
        """Blocks of `stage` finished before this run resumed (0 for a fresh run)."""
        return self.resumable.get(stage, 0)

    def block_done(self, stage: int, index: int, block: nn.Module, stream: dict) -> None:
        """Save finished block `index`, then commit it with `stream` (the state found so far) and the RNG."""
        if not (self.enabled and self.writer):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for m in block.modules():  # a cached fake-quant weight would double the file
            if hasattr(m, "drop_cache"):
                m.drop_cache()
        _atomic_save(block, self._block_file(stage, index))
        _atomic_save({**stream, "rng": _rng_state()}, self._stream_file(stage, index + 1))  # the commit
        if index:
            self._stream_file(stage, index).unlink(missing_ok=True)

    def restore_block(self, stage: int, index: int) -> nn.Module:
        return torch.load(self._block_file(stage, index), map_location="cpu", weights_only=False)

    def restore_stream(self, stage: int) -> dict:
        """What was committed with the last finished block; sets the RNG to where that block left it."""
        stream = dict(self.commits[stage])
        _set_rng_state(stream.pop("rng"))
        return stream

    def discard_if_unfinished(self) -> None:
        """After a failure: remove a checkpoint in which no block finished (it holds nothing to resume, and
        left behind it would make the next identical run refuse its save_path)."""
        if not (self.enabled and self.writer and self.folder.exists()):
            return
        if not any(self.folder.glob("stage*-stream-*.pt")):
            shutil.rmtree(self.folder, ignore_errors=True)

    def remove(self) -> None:
        if self.enabled and self.writer and not self.keep and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
            logger.info(f"run finished: removed its checkpoint {self.folder}")

    # ---- files -----------------------------------------------------------------------------------
    def _block_file(self, stage: int, index: int) -> Path:
        return self.folder / f"stage{stage}-block{index:04d}.pt"

    def _stream_file(self, stage: int, next_block: int) -> Path:
        return self.folder / f"stage{stage}-stream-{next_block:04d}.pt"

    def _write_manifest(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / "manifest.json", self.manifest)
