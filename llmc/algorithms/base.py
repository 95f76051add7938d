"""The algorithm protocol: a transform over one block and its captured inputs.

An algorithm never picks a device, opens a file or names a model family. Whatever a later stage
needs (AWQ scales and clips) it returns from `apply` as state keyed by full module name.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch

from llmc.errors import ConfigError
from pydantic import BaseModel, ConfigDict

from llmc.engine.block import BlockJob
from llmc.models.adapter import set_module
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs, bind_global, fake_quant


class Options(BaseModel):
    """`quant.special` for an algorithm; subclasses add fields. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def outputs(self) -> dict[str, str]:
        """State kinds the user asked to save (e.g. {"scales": path}); the engine writes them."""
        return {}

    def inputs(self) -> dict[str, str]:
        """State kinds to start from (e.g. {"clips": path}); the engine reads them into `Algorithm.loaded`."""
        return {}


def check_group_divides_out_features(adapter, group_size: int, why: str) -> None:
    """ConfigError unless group_size divides every quantized linear's out_features (grids grouped along
    output channels: HQQ axis 0, AdaDim); `why` says which setting groups them so."""
    for i, block in enumerate(adapter.block_list()):
        for name in adapter.linear_names():
            width = block.get_submodule(name).out_features
            if width % group_size:
                raise ConfigError("quant.weight.group_size", f"{group_size} does not divide out_features {width} "
                                  f"of {adapter.block_name(i)}.{name}; {why}, so group_size must divide every "
                                  "quantized linear's out_features")


class Algorithm:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    needs_targets: ClassVar[bool] = False   # wants the float block's outputs on the calibration data
    data_driven: ClassVar[bool] = False     # always needs calibration data (GPTQ, AWQ), not only for static acts
    # The result depends on the calibration samples, not on how they are batched (sums and maxima over
    # tokens): data parallel may deal the samples out in larger batches than calib.bs.
    batch_invariant: ClassVar[bool] = False
    weight_calib_algos: ClassVar[tuple[str, ...]] = ()  # weight range algorithms beyond minmax and mse
    # Changes float weights only by equivalent transformations (folds), so the engine checks the whole
    # block against its float output after `apply` (AWQ's v1 clip and GPTQ change weights by design).
    keeps_float: ClassVar[bool] = False
    # Folds scales into the float model (AWQ, SmoothQuant, OmniQuant's LET): the engine records the float
    # block's output first, so each fold can be checked against it.
    folds: ClassVar[bool] = False
    # Quantizes every linear on its own QuantLinear's grid (`args_of`), so `quant.mix_bits` may give
    # linears their own settings; others are refused with mix_bits.
    mixes_bits: ClassVar[bool] = False

    def __init__(self, wargs: Optional[QuantArgs], aargs: Optional[QuantArgs], options: Options):
        self.wargs, self.aargs, self.options = wargs, aargs, options
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}  # state from an earlier stage, by kind
        self.gates: tuple[str, ...] = ()  # float readers (MoE routers) opted into quantization: quant.quantize_gates
        # (weight, act) settings of linears that quant.mix_bits sets apart, by full name (llmc/config/mix_bits.py)
        self.layer_args: dict[str, tuple[Optional[QuantArgs], Optional[QuantArgs]]] = {}
        self.ignored: set[str] = set()  # full names of the linears that stay float (set by the run)
        self.bit_budget = None  # quant.auto_mix_bits' per-block width choice (llmc/engine/bit_budget.py)

    @classmethod
    def needs_calibration(cls, wargs: Optional[QuantArgs], aargs: Optional[QuantArgs], options: Options) -> bool:
        return cls.data_driven or bool(aargs and aargs.static)

    @classmethod
    def needs_block_inputs(cls, wargs: Optional[QuantArgs], aargs: Optional[QuantArgs], options: Options) -> bool:
        """Whether the blockwise pass runs the calibration samples through the blocks (a method may use the
        samples only in `prepare_model`)."""
        return cls.needs_calibration(wargs, aargs, options)

    @classmethod
    def produces(cls, options: Options) -> set[str]:
        """State kinds `apply` returns, which a later stage may start from."""
        return set()

    @classmethod
    def quant_out(cls, quant_cfg) -> bool:
        """Whether each block is fed the previous quantized block's outputs (`quant.quant_out`)."""
        return quant_cfg.quant_out

    @classmethod
    def check(cls, config) -> None:
        """Method-specific config checks, run before anything is loaded (raise ConfigError)."""

    @classmethod
    def check_model(cls, config, adapter) -> None:
        """Checks against the (meta-device) model's shapes, before any weight is loaded (raise ConfigError)."""

    def prepare_model(self, model, adapter, ctx, batches: Optional[list[torch.Tensor]] = None) -> None:
        """A model-level transform before the blockwise pass (QuaRot's rotation of the residual stream: the
        embeddings, every block and the head together; SpinQuant learns it on `batches`, this process's
        calibration samples); it must keep the float model. Default: nothing."""

    def apply(self, job: BlockJob, targets: Optional[list[torch.Tensor]]) -> dict:
        raise NotImplementedError

    # ---- shared steps ----------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_gates(self, job: BlockJob) -> list[str]:
        """Round-to-nearest the opted-in routers of this block in place (after the algorithm: they read the
        subset's input, so a fold has already scaled their columns); returns their names."""
        names = [r for s in job.subsets for r in s.readers if r in self.gates]
        for name in names:
            weight = job.module(name).weight
            weight.copy_(fake_quant(weight.detach().float(), bind_global(self.wargs, weight)).to(weight.dtype))
        return names

    def args_of(self, job: BlockJob, name: str) -> tuple[Optional[QuantArgs], Optional[QuantArgs]]:
        """The (weight, act) settings of one linear of the block: its quant.mix_bits setting, or the stage's."""
        return self.layer_args.get(job.full_name(name), (self.wargs, self.aargs))

    def install(self, job: BlockJob, name: str) -> QuantLinear:
        """Replace a linear of the block by a QuantLinear (idempotent)."""
        module = job.module(name)
        if isinstance(module, QuantLinear):
            return module
        qlinear = QuantLinear(module, *self.args_of(job, name))
        set_module(job.block, name, qlinear)
        return qlinear

    def install_all(self, job: BlockJob) -> dict[str, QuantLinear]:
        return {name: self.install(job, name) for name in job.quantized_layers()}

    def calibrate_static_acts(self, job: BlockJob, qlinears: dict[str, QuantLinear]) -> None:
        """Observe each quantized linear's input range over all batches, then fix static parameters."""
        if not (self.aargs and self.aargs.static):
            return
        for q in qlinears.values():
            q.act_quant.observing = True
        try:
            job.forward()
        finally:
            for q in qlinears.values():
                q.act_quant.observing = False
        for q in qlinears.values():
            stats = q.act_quant.observed_stats()
            q.act_quant.finish_observation({k: job.ctx.reduce(v, op) for k, (v, op) in stats.items()})
