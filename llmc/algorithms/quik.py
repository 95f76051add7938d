"""QUIK (Ashkboos et al., 2023): per linear, the input features with the largest activation peaks over the
calibration data (max |x| per feature, the l-inf norm: SmoothQuant's activation scales, which QUIK's
reference and LLMC rank by) stay float, both the weight's columns and the activation's features; the rest
of the weight is quantized by GPTQ with those columns last (llmc/algorithms/gptq.py, the float columns
absorb the error updates as in QUIK's reference), and the rest of the activation as `quant.act` says.

LLMC's keys: `fp_features` float features per linear (`fp_relative: True`: times in_features // hidden
size, so down_proj keeps more), `fp_threshold` (a linear whose largest peak is at most this keeps none),
`last_fc_bit` (bits of the MLP's output projection, weights and activations, whose threshold doubles, as
QUIK keeps down_proj at 8 bits in W4A4). The MLP's output projections are the linears of the subsets after
the block's last subset that no other linear of the block feeds (down_proj, fc2, every expert's down).
GPTQ's own keys (actorder, percdamp, blocksize, true_sequential, ...) apply to the integer part.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from loguru import logger
from pydantic import Field

from llmc.algorithms.gptq import GPTQ, GPTQOptions
from llmc.errors import ConfigError
from llmc.quant.fake_linear import QuantLinear
from llmc.registry import ALGORITHMS

PACKED = ("save_autoawq", "save_gptq", "save_vllm", "save_sgl")


class QUIKOptions(GPTQOptions):
    fp_features: int = Field(ge=0)
    fp_relative: bool = False
    fp_threshold: float = Field(0.0, ge=0)
    last_fc_bit: Optional[int] = Field(None, ge=2, le=8)


def float_count(opts: QUIKOptions, in_features: int, hidden: int) -> int:
    """Float features of a linear with in_features inputs in a model of residual width `hidden`."""
    return (in_features // hidden) * opts.fp_features if opts.fp_relative else opts.fp_features


def outlier_features(peaks: torch.Tensor, n: int, threshold: float) -> Optional[torch.Tensor]:
    """The n features of largest peak (sorted indices), or None when n is 0 or no peak exceeds threshold."""
    if n == 0 or peaks.max() <= threshold:
        return None
    return torch.sort(torch.argsort(peaks, descending=True, stable=True)[:n]).values


def last_fc_layers(subsets, quantized: list[str]) -> set[str]:
    """The MLP's output projections: linears of the subsets after the last one no linear of the block feeds."""
    linears = {n for s in subsets for n in s.layers}
    last_free = max(i for i, s in enumerate(subsets) if s.prev_op not in linears)
    return {n for s in subsets[last_free + 1:] for n in s.layers if n in quantized}


@ALGORITHMS.register("QUIK")
class QUIK(GPTQ):
    name = "QUIK"
    Options = QUIKOptions

    @classmethod
    def check(cls, config) -> None:
        q, opts = config.quant, QUIKOptions.model_validate(config.quant.special)
        for key in ("owq", "n_outs"):
            if key in config.quant.special:
                raise ConfigError(f"quant.special.{key}", f"{config.quant.special[key]} with QUIK: QUIK chooses its "
                                  "float columns by activation peaks (fp_features); remove it, or use method GPTQ")
        if q.weight is None:
            raise ConfigError("quant.weight", "QUIK quantizes weights by GPTQ: add a weight section")
        if q.act is not None and q.act.granularity not in ("per_token", "per_tensor"):
            raise ConfigError("quant.act.granularity", f"'{q.act.granularity}' with QUIK: its float features vary "
                              "per linear, so activation groups or heads do not line up; use per_token or per_tensor")
        if opts.last_fc_bit is not None and q.weight.quant_type != "int-quant":
            raise ConfigError("quant.special.last_fc_bit", f"{opts.last_fc_bit} with weight quant_type "
                              f"{q.weight.quant_type}: it sets integer bits; remove it or use int-quant weights")
        if opts.last_fc_bit is not None and q.mix_bits:
            raise ConfigError("quant.special.last_fc_bit", f"{opts.last_fc_bit} with quant.mix_bits: both would set the "
                              "MLP output projections' bits; give them a mix_bits setting (layer_name: [down_proj]) "
                              "and remove last_fc_bit, or remove mix_bits")
        if opts.static_groups and opts.fp_features:
            raise ConfigError("quant.special.static_groups", "True with QUIK: its groups are formed over the columns "
                              "it quantizes, after setting the float ones aside; set static_groups: False")
        packed = [k for k in PACKED if getattr(config.save, k)]
        if packed and opts.fp_features:
            raise ConfigError(f"save.{packed[0]}", "QUIK's float input features cannot be stored by packed formats "
                              "(one integer grid for every column); save_fake writes the QUIK model")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        opts = QUIKOptions.model_validate(config.quant.special)
        hidden = adapter.model.config.hidden_size
        for i, block in enumerate(adapter.block_list()):
            for name in adapter.block_linear_names(i):
                width = block.get_submodule(name).in_features
                n = float_count(opts, width, hidden)
                if n >= width:
                    raise ConfigError("quant.special.fp_features", f"{opts.fp_features} gives {n} float features for "
                                      f"{adapter.block_name(i)}.{name}, which has {width} inputs; expected fewer")

    def __init__(self, wargs, aargs, options):
        super().__init__(wargs, aargs, options)
        logger.info(f"QUIK: {options.fp_features} float input features per linear"
                    + (" x in_features // hidden" if options.fp_relative else "")
                    + f" (largest calibration peaks above {options.fp_threshold:g})"
                    + (f"; MLP output projections at {options.last_fc_bit} bits" if options.last_fc_bit else ""))
        self._peaks: dict[str, torch.Tensor] = {}
        self._float: dict[str, Optional[torch.Tensor]] = {}

    def observe(self, source: str, x: torch.Tensor) -> None:
        peak = x.abs().amax(dim=0).float()
        self._peaks[source] = torch.maximum(self._peaks[source], peak) if source in self._peaks else peak

    def hessians(self, job, inputs):
        self._peaks = {}
        out = super().hessians(job, inputs)
        self._peaks = {k: job.ctx.reduce(v, "max") for k, v in self._peaks.items()}
        return out

    def install(self, job, name: str) -> QuantLinear:
        fresh = not isinstance(job.module(name), QuantLinear)
        q = super().install(job, name)
        if fresh:
            self._choose(job, name, q)
        return q

    def _choose(self, job, name: str, q: QuantLinear) -> None:
        """Fix the linear's float features (and last_fc_bit) before GPTQ quantizes it."""
        opts: QUIKOptions = self.options
        threshold = opts.fp_threshold
        if opts.last_fc_bit is not None and name in last_fc_layers(job.subsets, job.quantized_layers()):
            threshold *= 2
            q.wargs = replace(q.wargs, bit=opts.last_fc_bit)
            if q.act_quant is not None:
                q.act_quant.args = replace(q.act_quant.args, bit=opts.last_fc_bit)
        source = next(s.input_of(name) for s in job.subsets if name in s.layers)
        n = float_count(opts, q.in_features, job.inputs.hidden[0].shape[-1])
        cols = outlier_features(self._peaks[source], n, threshold)
        self._float[name] = cols
        if q.act_quant is not None:
            q.set_act_float_cols(cols)

    def weak_columns(self, job, name, W, H):
        return self._float.get(name)

    def apply(self, job, targets):
        self._float = {}
        return super().apply(job, targets)
