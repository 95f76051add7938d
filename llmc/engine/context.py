"""What a run needs besides the model: the compute device, dtype, where activations live, timings, and
the reduction hook that makes every accumulated statistic summable across processes."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from loguru import logger
from torch import nn

from llmc.engine import distributed
from llmc.engine.offload import BlockStore
from llmc.models.load import DTYPES


@dataclass
class RunContext:
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    activations_on: str = "device"          # or "cpu": captured activations kept off the compute device
    offload_device: torch.device = torch.device("cpu")
    timings: dict[str, float] = field(default_factory=dict)
    shard: distributed.Shard = field(default_factory=distributed.Shard)  # this process among the data-parallel ones
    store: Optional["BlockStore"] = None  # model.offload: disk: where blocks live off the device
    check_folds: bool = True  # the fold guard (llmc/engine/guard.py): base.check_folds
    seed: int = 0  # base.seed: algorithms that draw at random (SignRound's mini-batches) seed from it

    @classmethod
    def from_config(cls, config, device: torch.device, shard: Optional[distributed.Shard] = None) -> "RunContext":
        calib = config.calib
        return cls(device=device, compute_dtype=DTYPES[config.model.compute_dtype],
                   activations_on=calib.activations_on if calib else "device", shard=shard or distributed.Shard(),
                   check_folds=config.base.check_folds, seed=config.base.seed)

    @property
    def activation_device(self) -> torch.device:
        return self.device if self.activations_on == "device" else torch.device("cpu")

    def onload(self, module: nn.Module) -> nn.Module:
        if self.store is not None and self.store.holds(module):
            return self.store.load(module, self.device)
        return module.to(self.device)

    def offload(self, module: nn.Module, changed: bool = False) -> nn.Module:
        """Off the compute device; a streamed block leaves memory (written first if `changed`)."""
        if self.store is not None and self.store.holds(module):
            return self.store.store(module, changed)
        return module.to(self.offload_device)

    @property
    def world_size(self) -> int:
        return self.shard.world

    @property
    def is_main(self) -> bool:
        """The process that logs, evaluates and writes."""
        return self.shard.rank == 0

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Combine a statistic across processes (one process: unchanged). op: sum, max or min."""
        return tensor if self.shard.world == 1 else distributed.reduce(tensor, op)

    def owner(self, index: int) -> int:
        """The rank that computes the index-th expensive solve of a block (round robin)."""
        return index % self.shard.world

    def share(self, tensors: Optional[tuple], owner: int) -> tuple:
        """The owner's result (a tuple of tensors or None; other ranks pass None) on every rank, on the
        device each rank computes on."""
        if self.shard.world == 1:
            return tensors
        mine = self.shard.rank == owner
        cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors) if mine else None
        got = distributed.broadcast_object(cpu, owner)
        return tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in got)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        enabled = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled):
            yield

    @contextmanager
    def dtype(self, name: "str | None") -> Iterator[None]:
        """Forwards inside run in `name` (None: unchanged)."""
        saved = self.compute_dtype
        self.compute_dtype = DTYPES[name] if name else saved
        try:
            yield
        finally:
            self.compute_dtype = saved

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[phase] = self.timings.get(phase, 0.0) + elapsed
            logger.info(f"{phase}: {elapsed:.1f} s")
