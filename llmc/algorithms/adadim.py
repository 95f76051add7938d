"""AdaDim (LLMC's `quant.method: AdaDim`): per linear, quantize the weight along its output channels (the
usual grid: per output channel, or groups of input columns) or along its input channels (per input column,
or groups of output channels; QuantLinear's axis 0), whichever gives the smaller output error on the
calibration inputs; rounding to nearest on the chosen grid.

The output error of a weight error ΔW over inputs X is ‖X ΔWᵀ‖² = tr(ΔW (XᵀX) ΔWᵀ), so each linear's inputs
are summed once into XᵀX (reducible across processes) and both candidates are scored from it. LLMC
averages per-batch mean squared errors weighted by batch size, the same order between the two candidates
for batches of equal length. As LLMC, the inputs are those of the float block (one pass before anything
is quantized) and the search compares weights only (activations unquantized); ties keep the output grid.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from loguru import logger

from llmc.algorithms.base import check_group_divides_out_features, Algorithm, Options
from llmc.algorithms.gptq import add_gram, symmetric_gram
from llmc.errors import ConfigError
from llmc.quant.quantizer import QuantArgs, fake_quant
from llmc.registry import ALGORITHMS

PACKED = ("save_autoawq", "save_gptq", "save_vllm", "save_sgl")


class AdaDimOptions(Options):
    """LLMC's AdaDim takes no special keys."""


def axis_errors(W: torch.Tensor, gram: torch.Tensor, args: QuantArgs) -> dict[int, float]:
    """Output error tr(ΔW·XᵀX·ΔWᵀ) of RTN along output channels (axis 1) and along input channels (axis 0)."""
    W = W.float()
    errors = {}
    for axis in (1, 0):
        q = fake_quant(W.T, args).T if axis == 0 else fake_quant(W, args)
        delta = q - W
        errors[axis] = float(((delta @ gram) * delta).sum())
    return errors


@ALGORITHMS.register("AdaDim")
class AdaDim(Algorithm):
    name = "AdaDim"
    Options = AdaDimOptions
    data_driven = True
    mixes_bits = True

    @classmethod
    def check(cls, config) -> None:
        AdaDimOptions.model_validate(config.quant.special)
        w = config.quant.weight
        if w is None:
            raise ConfigError("quant.weight", "AdaDim chooses the weights' quantization dimension: a weight section "
                              "is required")
        if w.granularity not in ("per_channel", "per_group"):
            raise ConfigError("quant.weight.granularity", f"{w.granularity}: AdaDim chooses between output and input "
                              "channels, which only per_channel and per_group grids distinguish")
        for key in PACKED:
            if getattr(config.save, key, False):
                raise ConfigError(f"save.{key}", "True with AdaDim: a linear quantized along its input channels has a "
                                  "grid the packed formats do not store; use save_fake")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        w = config.quant.weight
        if w.granularity != "per_group":
            return
        check_group_divides_out_features(adapter, w.group_size, "AdaDim may group output channels")

    def apply(self, job, targets):
        sources = sorted({s.input_of(n) for s in job.subsets for n in job.quantized_layers(s)})
        sums: dict[str, torch.Tensor] = {}

        def add(source: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            if source not in sums:
                sums[source] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            add_gram(sums[source], x)

        job.collect(sources, add)
        grams = {k: symmetric_gram(job.ctx.reduce(v)) for k, v in sums.items()}
        installed = {}
        for subset in job.subsets:
            for name in job.quantized_layers(subset):
                q = self.install(job, name)
                gram = grams.get(subset.input_of(name))
                if gram is None:  # an expert no calibration token reached: nothing to compare on
                    q.set_weight_qparams()
                    installed[name] = q
                    logger.info(f"AdaDim {job.full_name(name)}: no calibration input; per output channel")
                    continue
                err = axis_errors(q.weight.detach(), gram, replace(q.wargs, ste=False))
                axis = 0 if err[0] < err[1] else 1
                q.set_weight_qparams(axis=axis)
                installed[name] = q
                logger.info(f"AdaDim {job.full_name(name)}: per {'input' if axis == 0 else 'output'} channel "
                            f"(output error {err[0]:.4g} along inputs, {err[1]:.4g} along outputs)")
        self.calibrate_static_acts(job, installed)
        return {}
