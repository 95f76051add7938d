"""Round-to-nearest: each weight on its grid from its own range (minmax or mse); data-free unless
static activation ranges need calibrating."""
from __future__ import annotations

from typing import Optional

from llmc.algorithms.base import Algorithm, Options
from llmc.errors import ConfigError
from llmc.registry import ALGORITHMS

# Intel Neural Compressor's RTN options and where llmc keeps them: on the weight quantizer, so that every
# algorithm, the plan and every exporter read one grid (an RTN-only alias would be a second place for it).
# INC's mse search picks one clip ratio per linear (1 ... 0.805 in 40 steps, squared weight error); llmc's picks
# one per group, so the spelling given is the nearest setting, not an alias.
INC_KEYS = {"enable_full_range": "quant.weight.full_range: True (the same grid)",
            "enable_mse_search": "quant.weight.calib_algo: mse, the nearest setting (with maxshrink: 0.2, mse_grid: "
                                 "200, mse_norm: 2 for INC's candidate ratios and squared error; llmc picks the ratio "
                                 "per group, INC one per linear)"}


class RtnOptions(Options):
    enable_full_range: Optional[bool] = None
    enable_mse_search: Optional[bool] = None


@ALGORITHMS.register("RTN")
class RTN(Algorithm):
    name = "RTN"
    batch_invariant = True  # data only for static activations (their min/max)
    mixes_bits = True
    Options = RtnOptions

    @classmethod
    def check(cls, config) -> None:
        opts = RtnOptions.model_validate(config.quant.special)
        for key, spelling in INC_KEYS.items():
            if key in opts.model_fields_set:
                raise ConfigError(f"quant.special.{key}", f"{getattr(opts, key)}: Intel Neural Compressor's RTN key; "
                                  f"llmc's grid settings live on the quantizer: write {spelling} "
                                  "(and remove this key)")

    def apply(self, job, targets):
        qlinears = self.install_all(job)
        for q in qlinears.values():
            q.set_weight_qparams()
        self.calibrate_static_acts(job, qlinears)
        return {}
