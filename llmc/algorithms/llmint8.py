"""LLM.int8() (Dettmers et al., 2022): mixed-precision decomposition at run time. In every forward, the input
features holding a value of magnitude >= `threshold` (6.0 in the paper) anywhere in the call, with their
weight columns, are multiplied in float; the rest in int8, activations per token and weights per output
channel (vector-wise), the weight's grid found on its remaining columns. Data-free: nothing is calibrated,
and the float weights stay as they are (llmc/quant/fake_linear.py: QuantLinear._decomposed); save_fake
writes them float with the settings, which load_fake_quant re-installs.
"""
from __future__ import annotations

from loguru import logger
from pydantic import Field

from llmc.algorithms.base import Algorithm, Options
from llmc.errors import ConfigError
from llmc.registry import ALGORITHMS

PACKED = ("save_autoawq", "save_gptq", "save_vllm", "save_sgl")


class LlmInt8Options(Options):
    threshold: float = Field(6.0, gt=0)


@ALGORITHMS.register("LlmInt8")
class LlmInt8(Algorithm):
    name = "LlmInt8"
    Options = LlmInt8Options

    @classmethod
    def check(cls, config) -> None:
        q = config.quant
        if q.weight is None or q.act is None:
            missing = "quant.weight" if q.weight is None else "quant.act"
            raise ConfigError(missing, "LlmInt8 decomposes the product of activations and weights: it needs both a "
                              "weight and an act section")
        if q.weight.granularity == "per_group":
            raise ConfigError("quant.weight.granularity", "'per_group' with LlmInt8: the float columns change with "
                              "every input, so groups along the input cannot be fixed; use per_channel (the paper's)")
        if q.act.static:
            raise ConfigError("quant.act.static", "True with LlmInt8: the outlier features are found per input, so "
                              "activation ranges are dynamic; set static: False")
        if q.act.granularity not in ("per_token", "per_tensor"):
            raise ConfigError("quant.act.granularity", f"'{q.act.granularity}' with LlmInt8: the float features vary "
                              "per input, so groups or heads do not line up; use per_token (the paper's) or per_tensor")
        packed = [k for k in PACKED if getattr(config.save, k)]
        if packed:
            raise ConfigError(f"save.{packed[0]}", "LlmInt8 decides its float columns per input at run time, which no "
                              "packed format stores; save_fake writes the float weights and the settings")

    def __init__(self, wargs, aargs, options):
        super().__init__(wargs, aargs, options)
        logger.info(f"LlmInt8: input features with |x| >= {options.threshold:g} computed in float, per forward")

    def apply(self, job, targets):
        for q in self.install_all(job).values():
            q.outlier_threshold = self.options.threshold
        return {}
