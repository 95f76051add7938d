"""`calib_algo: static_hist`: LLMC's histogram search for a static per-tensor activation range (the
non-linear search of PyTorch's HistogramObserver, as LLMC's quantizer runs it).

Per calibration batch the input's histogram (2048 bins over its own [min, max]) is merged into a running
one: when the range grows, the running histogram is spread onto the new bins (each bin cut into 16 parts,
each part's mass sent to the new bin holding its midpoint). At the end, the range is narrowed bin by bin,
from whichever tail holds less mass (quantiles stepped by 1e-8), while the L2 error of quantizing the
histogram onto 2^bit levels over the narrowed range keeps falling. Symmetric use: absmax of the result.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

BINS = 2048
UPSAMPLE = 16
STEP = 1e-8


class HistogramRange:
    """Running histogram of every value seen (LLMC's per-tensor static_hist)."""

    def __init__(self, bit: int, bins: int = BINS):
        self.bins, self.levels = bins, 2 ** bit
        self.hist: Optional[torch.Tensor] = None
        self.lo = self.hi = None

    def update(self, x: torch.Tensor) -> None:
        self.device = x.device  # where the searched range goes back to
        x = x.detach().float().cpu()
        xmin, xmax = x.min(), x.max()
        if self.hist is None:
            self.hist, self.lo, self.hi = torch.histc(x, self.bins, min=xmin.item(), max=xmax.item()), xmin, xmax
            return
        lo, hi = torch.min(self.lo, xmin), torch.max(self.hi, xmax)
        new = torch.histc(x, self.bins, min=lo.item(), max=hi.item())
        if lo == self.lo and hi == self.hi:
            self.hist = self.hist + new
        else:
            self.hist = new + self._respread(lo, hi, new)
        self.lo, self.hi = lo, hi

    def _respread(self, lo: torch.Tensor, hi: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The running histogram on the bins of [lo, hi]."""
        if self.lo == self.hi:  # a single value so far; LLMC weighs it by the new batch's count
            return torch.histc(self.lo.reshape(1), self.bins, min=lo.item(), max=hi.item()) * new.sum()
        fine = self.hist.repeat_interleave(UPSAMPLE) / UPSAMPLE
        width = (self.hi - self.lo) / (self.bins * UPSAMPLE)
        mids = torch.linspace(self.lo, self.hi, self.bins * UPSAMPLE + 1)[:-1] + 0.5 * width
        edges = torch.linspace(lo, hi, self.bins + 1)
        idx = (torch.bucketize(mids, edges, right=True) - 1).clamp(0, self.bins - 1)
        return torch.bincount(idx, weights=fine, minlength=self.bins)

    def _error(self, start: int, end: int) -> float:
        """L2 error of quantizing the histogram onto `levels` uniform bins spanning bins start..end."""
        bin_width = (self.hi.item() - self.lo.item()) / self.bins
        dst_width = bin_width * (end - start + 1) / self.levels
        if dst_width == 0.0:
            return 0.0
        src = torch.arange(self.bins)
        begin = (src - start) * bin_width
        stop = begin + bin_width
        dst_begin = torch.clamp(torch.div(begin, dst_width, rounding_mode="floor"), 0, self.levels - 1)
        dst_end = torch.clamp(torch.div(stop, dst_width, rounding_mode="floor"), 0, self.levels - 1)
        density = self.hist / bin_width

        def l2(a, b):  # ∫_a^b x² dx times the density
            return density * (b * b * b - a * a * a) / 3

        half = dst_width / 2
        err = l2(begin - (dst_begin + 0.5) * dst_width, torch.full((self.bins,), half))
        err = err + (dst_end - dst_begin - 1) * l2(torch.tensor(-half), torch.tensor(half))
        err = err + l2(torch.tensor(-half), stop - (dst_end * dst_width + half))
        return err.sum().item()

    def threshold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The searched (min, max)."""
        if self.hist is None:
            raise RuntimeError("static_hist saw no calibration input")
        csum = np.asarray(torch.cumsum(self.hist, dim=0), dtype=np.float32)
        total = self.hist.sum().item()
        alpha, beta, start, end = 0.0, 1.0, 0, self.bins - 1
        best = float("inf")
        while alpha < beta:
            a, b = alpha + STEP, beta - STEP
            left, right = start, end
            # compared in float32, as the float32 cumulative sum is compared against a Python float in LLMC
            while left < end and csum[left] < np.float32(a * total):
                left += 1
            while right > start and csum[right] > np.float32(b * total):
                right -= 1
            new_start, new_end = start, end
            if left - start > end - right:
                new_start, alpha = left, a
            else:
                new_end, beta = right, b
            if new_start == start and new_end == end:
                continue
            err = self._error(new_start, new_end)
            if err > best:
                break
            best, start, end = err, new_start, new_end
        width = (self.hi - self.lo) / self.bins
        return (self.lo + width * start).to(self.device), (self.lo + width * (end + 1)).to(self.device)
