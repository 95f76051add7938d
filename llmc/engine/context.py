"""What a run needs besides the model: the compute device, dtype, where activations live, timings, and
the reduction hook that makes every accumulated statistic summable across processes."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from loguru import logger
from torch import nn

from llmc.models.load import DTYPES


@dataclass
class RunContext:
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    activations_on: str = "device"          # or "cpu": captured activations kept off the compute device
    offload_device: torch.device = torch.device("cpu")
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, device: torch.device) -> "RunContext":
        calib = config.calib
        return cls(device=device, compute_dtype=DTYPES[config.model.compute_dtype],
                   activations_on=calib.activations_on if calib else "device")

    @property
    def activation_device(self) -> torch.device:
        return self.device if self.activations_on == "device" else torch.device("cpu")

    def onload(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def offload(self, module: nn.Module) -> nn.Module:
        return module.to(self.offload_device)

    @property
    def world_size(self) -> int:
        return 1

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Combine a statistic across processes (one process: unchanged). op: sum, max or min."""
        return tensor

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
