"""Input second moments H = 2/n Σ x xᵀ of a block's linears, as GPTQ and its relatives need them.

Linears that read the very same tensor in every calibration batch (q/k/v, gate/up, and under
`calibrate_all_experts` the gate/up of every expert) share one accumulator and one returned matrix:
a MoE block with 128 experts would otherwise sum (and hold) 256 copies of the same Hessian. Sharing is
decided from the tensors themselves (the same storage within a batch), so it holds exactly whatever
the model's forward does, and a group splits as soon as one batch feeds its members different tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

GRAM_CHUNK = 192  # column block of the symmetric accumulation (fastest measured for 576 and 1536 inputs)


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += xᵀx on its upper block triangle only (the lower is mirrored by `symmetric_gram`): the
    Hessian is symmetric, so this skips up to half the float32 multiply-adds of the full product."""
    d = x.shape[1]
    if d <= GRAM_CHUNK:
        total.addmm_(x.T, x)
        return
    for start in range(0, d, GRAM_CHUNK):
        stop = min(start + GRAM_CHUNK, d)
        total[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])


def symmetric_gram(total: torch.Tensor) -> torch.Tensor:
    """The full matrix from an `add_gram` accumulator, in place: its upper triangle mirrored (the blocks
    below the diagonal blocks were never written). In place because down_proj's is 127 MB on a 1B model."""
    d = total.shape[0]
    if d <= GRAM_CHUNK:
        return total
    for start in range(0, d, GRAM_CHUNK):
        stop = min(start + GRAM_CHUNK, d)
        diagonal = total[start:stop, start:stop]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
        total[stop:, start:stop] = total[start:stop, stop:].T
    return total


def _storage_key(x: Optional[torch.Tensor]) -> tuple:
    if x is None:
        return ()
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


class HessianSums:
    """Gram sums and token counts per input name, shared by names fed the same tensor in every batch.

    `add(name, x)` during a batch only records x; `end_batch()` refines the sharing groups by that batch's
    tensors and adds one Gram product per distinct tensor."""

    def __init__(self) -> None:
        self.group_of: dict[str, int] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.batch: dict[str, torch.Tensor] = {}
        self._next = 0

    def add(self, name: str, x: torch.Tensor) -> None:
        if name in self.batch:  # a module called twice in one forward: both calls count
            self._flush_one(name, self.batch.pop(name))
        self.batch[name] = x

    def _new_group(self, like: Optional[int]) -> int:
        gid, self._next = self._next, self._next + 1
        if like is not None and like in self.sums:
            self.sums[gid], self.counts[gid] = self.sums[like].clone(), self.counts[like]
        return gid

    def _flush_one(self, name: str, x: torch.Tensor) -> None:
        """Add x for `name` alone, splitting it from its group first (it no longer reads what they read)."""
        old = self.group_of.get(name)
        if old is None or sum(g == old for g in self.group_of.values()) > 1:
            self.group_of[name] = self._new_group(old)
        self._accumulate(self.group_of[name], x)

    def _accumulate(self, gid: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if gid not in self.sums:
            self.sums[gid] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.counts[gid] = 0
        add_gram(self.sums[gid], x)
        self.counts[gid] += x.shape[0]

    def end_batch(self) -> None:
        # Names absent from this batch (an expert no token reached) keep the key (), so they stay with each
        # other and apart from the names that got a tensor.
        names = sorted(set(self.group_of) | set(self.batch))
        parts: dict[tuple, list[str]] = {}
        for name in names:
            parts.setdefault((self.group_of.get(name, -1), _storage_key(self.batch.get(name))), []).append(name)
        # every split is cloned from sums holding the earlier batches only, then this batch is added
        kept: set[int] = set()
        targets = []
        for (old, key), members in parts.items():
            gid = old if old != -1 and old not in kept else self._new_group(None if old == -1 else old)
            kept.add(old)
            for name in members:
                self.group_of[name] = gid
            if key:
                targets.append((gid, self.batch[members[0]]))
        for gid, x in targets:
            self._accumulate(gid, x)
        self.batch.clear()

    def hessians(self, reduce) -> dict[str, torch.Tensor]:
        """name → 2/n Σ xxᵀ, summed across processes by `reduce`; names of one group get the same tensor
        object (a caller can tell which linears share a Hessian by identity)."""
        assert not self.batch, "end_batch() was not called after the last batch"
        done: dict[int, torch.Tensor] = {}
        out = {}
        for name in sorted(self.group_of):  # one order on every rank: the reductions pair up
            gid = self.group_of[name]
            if gid not in done:
                total = self.sums.pop(gid)
                n = reduce(torch.tensor(float(self.counts[gid]), device=total.device))
                done[gid] = symmetric_gram(reduce(total)).mul_(2 / n)
            out[name] = done[gid]
        return out
