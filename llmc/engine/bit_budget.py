"""quant.auto_mix_bits: each block's share of an average bit budget spent where its output error falls most.

Before a block's method runs, every quantized linear is round-to-nearest quantized alone at each option
and the block run on the calibration samples: err[l][k] is the summed squared difference from the float
block's output. Starting from the narrowest option everywhere, upgrades (linear l from option k to a wider
k') are taken greedily by error removed per extra bit stored, while the block's share of the budget lasts.
The share is what the budget has left over the weights still to come, times this block's weights, so what
one block leaves unspent goes to the next. The errors are summed over data-parallel processes, so every
process chooses the same widths.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from loguru import logger

from llmc.engine.block import BlockJob
from llmc.quant.bits import linear_bits, planned_bits
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs, fake_quant


class BitBudget:
    def __init__(self, cfg, wargs: QuantArgs, aargs: Optional[QuantArgs], shapes: list[tuple[int, int]]):
        self.options = [replace(wargs, bit=b) for b in cfg.options]
        self.aargs, self.n_samples = aargs, cfg.n_samples
        self.weights_left = sum(o * i for o, i in shapes)
        self.bits_left = cfg.avg_bits * self.weights_left
        self.chosen: dict[str, int] = {}  # full linear name -> code width, as quantized

    def allocate(self, job: BlockJob) -> dict[str, tuple[QuantArgs, Optional[QuantArgs]]]:
        """The (weight, act) settings of this block's quantized linears."""
        names = job.quantized_layers()
        shapes = [(job.module(n).out_features, job.module(n).in_features) for n in names]
        cost = [[planned_bits(a, o, i) for a in self.options] for o, i in shapes]
        weights = sum(o * i for o, i in shapes)
        share = self.bits_left * weights / max(self.weights_left, weights)
        err = self.errors(job, names)
        level = [0] * len(names)
        spare = share - sum(c[0] for c in cost)
        while True:
            best = None
            for j in range(len(names)):
                for k in range(level[j] + 1, len(self.options)):
                    extra = cost[j][k] - cost[j][level[j]]
                    gain = float(err[j, level[j]] - err[j, k])
                    if extra <= spare and gain > 0 and (best is None or gain / extra > best[0]):
                        best = (gain / extra, j, k)
            if best is None:
                break
            _, j, k = best
            spare -= cost[j][k] - cost[j][level[j]]
            level[j] = k
        widths = {n: self.options[k].bit for n, k in zip(names, level)}
        logger.info(f"{job.name}: auto_mix_bits " + ", ".join(f"{n} {b}" for n, b in widths.items())
                    + f" ({(share - spare) / weights:.3f} of {share / weights:.3f} bits per weight)")
        return {job.full_name(n): (self.options[k], self.aargs) for n, k in zip(names, level)}

    @torch.no_grad()
    def errors(self, job: BlockJob, names: list[str]) -> torch.Tensor:
        """[linear, option]: the block's squared output error with only that linear quantized at that option."""
        hidden, total = [], 0
        for h in job.inputs.hidden:  # whole batches: their masks and positions come per batch
            if self.n_samples is not None and total >= self.n_samples:
                break
            hidden.append(h)
            total += h.shape[0]
        reference = job.forward(hidden)
        err = torch.zeros(len(names), len(self.options), dtype=torch.float64)
        for j, name in enumerate(names):
            weight = job.module(name).weight
            original = weight.data
            for k, args in enumerate(self.options):
                weight.data = fake_quant(original.float(), args).to(original.dtype)
                try:
                    outs = job.forward(hidden)
                finally:
                    weight.data = original
                err[j, k] = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, reference))
        return job.ctx.reduce(err.to(job.ctx.device)).cpu()

    def account(self, job: BlockJob) -> None:
        """Charge the budget what this block's linears take as quantized (replayed blocks too)."""
        for name, module in job.block.named_modules():
            if isinstance(module, QuantLinear) and module.wargs is not None:
                self.bits_left -= linear_bits(module)
                self.weights_left -= module.in_features * module.out_features
                self.chosen[job.full_name(name)] = int(module.wargs.bit)

    def summary(self) -> str:
        counts: dict[int, int] = {}
        for b in self.chosen.values():
            counts[b] = counts.get(b, 0) + 1
        return "auto_mix_bits: " + ", ".join(f"{n} linears at {b} bits" for b, n in sorted(counts.items()))
