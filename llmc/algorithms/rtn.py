"""Round-to-nearest: each weight on its grid from its own range (minmax or mse); data-free unless
static activation ranges need calibrating."""
from __future__ import annotations

from llmc.algorithms.base import Algorithm
from llmc.registry import ALGORITHMS


@ALGORITHMS.register("RTN")
class RTN(Algorithm):
    name = "RTN"
    mixes_bits = True

    def apply(self, job, targets):
        qlinears = self.install_all(job)
        for q in qlinears.values():
            q.set_weight_qparams()
        self.calibrate_static_acts(job, qlinears)
        return {}
