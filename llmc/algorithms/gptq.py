"""GPTQ (Frantar et al., 2022): quantize a linear column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of its inputs, H = 2/n Σ x xᵀ.

Faithful to IST-DASLab/gptq: lazy batch updates in blocks of `blocksize`, group parameters found on the
already-updated weights when a group starts, `actorder` (desc_act) with optional `static_groups`, and
`percdamp` dampening (raised and retried, with a log line, when the Cholesky factorisation fails).
Hessians and updates are float32 whatever the model dtype; the Hessian is kept as a sum plus a sample
count so it can be added up across processes.

OWQ (Lee et al., 2024; LLMC's `owq: True` with `n_outs`): per linear, the n_out input columns most
sensitive to quantization, H_jj·‖W_:j - RTN(W)_:j‖² with a per-channel RTN grid (the paper and its
reference; `owq_sensitivity: hessian` ranks by H_jj alone, as LLMC does), are moved last and kept in
float; GPTQ quantizes the others in order (groups formed over them) and its error updates reach the weak
columns too, which keep those compensated float values.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Literal, Optional, Union

import torch
from loguru import logger
from pydantic import Field

from llmc.algorithms.base import Algorithm, Options
from llmc.algorithms.hessian import HessianSums, add_gram, symmetric_gram  # noqa: F401 (re-exported)
from llmc.errors import ConfigError
from llmc.quant.quantizer import QuantArgs, bind_global, calibrate, dequantize, fake_quant, quantize
from llmc.registry import ALGORITHMS


class GPTQOptions(Options):
    actorder: bool = False
    static_groups: bool = False
    percdamp: float = Field(0.01, gt=0, le=1)  # dampening, a fraction of the Hessian's mean diagonal
    blocksize: int = Field(128, ge=1)
    true_sequential: bool = True
    owq: bool = False  # OWQ: keep each linear's n_out weakest input columns in float
    # float columns per linear, in the adapter's order (Llama: q, k, v, o, gate, up, down, as LLMC), or one
    # count for every linear (llmc's shorthand)
    n_outs: Optional[Union[int, list[int]]] = None
    owq_sensitivity: Literal["error", "hessian"] = "error"
    # LLMC accumulates each Hessian over chunk_num token chunks: the same sum in less memory.
    chunk_num: int = Field(1, ge=1)
    # LLMC's step after QuaRot: the model carries QuaRot's online Hadamards (re-attached from the checkpoint's
    # record, or kept from an earlier Quarot stage); checked against it (llmc/algorithms/quarot.py).
    online_rotate: bool = False
    fp32_had: bool = False


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, where: str = "") -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening; the dampening grows tenfold until it factorises.
    H is left as it was. The factor is computed in one copy of it, worked on in place through its
    column-major view (LAPACK's layout; a row-major one costs a temporary copy per step), so only two
    n x n matrices are alive (down_proj's is 127 MB on a 1B model). Returned column-major, as
    torch.linalg.cholesky returns it (the column loop's rounding depends on the layout)."""
    diag = torch.arange(H.shape[0], device=H.device)
    mean = torch.mean(torch.diag(H))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        F = H.clone().mT  # symmetric: the same matrix
        F[diag, diag] += percdamp * mean
        torch.linalg.cholesky_ex(F, out=(F, info))
        if info == 0:
            torch.cholesky_inverse(F, out=F)
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
            if info == 0:
                return F
        del F
        logger.warning(f"GPTQ {where}: Cholesky failed with percdamp {percdamp:g}; retrying with {percdamp * 10:g}")
        percdamp *= 10
    raise RuntimeError(f"GPTQ {where}: Hessian not positive definite even with percdamp {percdamp:g}")


def weak_columns(W: torch.Tensor, H: torch.Tensor, n_out: int, args: QuantArgs, sensitivity: str = "error"
                 ) -> torch.Tensor:
    """OWQ's weak columns, sorted: the n_out input columns of largest sensitivity, H_jj·‖W_:j - RTN(W)_:j‖²
    with a per-channel grid of the weight's bits ("error", the paper's), or H_jj alone ("hessian", LLMC)."""
    score = torch.diag(H).float()
    if sensitivity == "error":
        per_row = replace(args, granularity="per_channel", group_size=-1)
        score = score * (W.float() - fake_quant(W.float(), per_row)).pow(2).sum(dim=0)
    return torch.sort(torch.argsort(score, descending=True, stable=True)[:n_out]).values


STACK_ELEMENTS = 1 << 25  # weights of one stacked solve (128 MB in float32; the solve holds a few copies)


def stacked_gptq(weights: list[torch.Tensor], H: torch.Tensor, args: QuantArgs, opts: GPTQOptions, where: str
                 ) -> list[tuple]:
    """GPTQ of linears sharing one Hessian as one matrix of their stacked rows: a row's updates involve
    only that row and H, so each linear gets its own GPTQ result, from one factorisation and one column
    loop. Returns (Q, scale, zero, g_idx, None, None) per weight: gptq_quantize's layout, no float columns,
    no storage bits of its own."""
    rows = [w.shape[0] for w in weights]
    Q, scale, zero, g_idx = gptq_quantize(torch.cat([w.float() for w in weights]), H, args, opts, where)
    total = sum(rows)
    parts = zip(Q.split(rows), scale.reshape(total, -1).split(rows), zero.reshape(total, -1).split(rows))
    flat = (lambda t: t) if g_idx is not None else (lambda t: t.reshape(-1, 1))
    return [(q, flat(s), flat(z), g_idx, None, None) for q, s, z in parts]


class SolverHook:
    """Extension points of `gptq_quantize` (SpQR, llmc/algorithms/spqr.py); the default is plain GPTQ."""

    def start(self, W: torch.Tensor, Hinv: torch.Tensor, perm: Optional[torch.Tensor]) -> None:
        """Once, with the (permuted) weight and the upper Cholesky factor of H⁻¹ before any column is done."""

    def group(self, G: torch.Tensor, col: int, hinv_diag: torch.Tensor, args: QuantArgs
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the group starting at (permuted) column col; G holds its current values."""
        return calibrate(G, args)

    def column(self, col: int, w: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The value column col keeps (q: its dequantized grid value, d: H⁻¹'s factor diagonal there)."""
        return q

    def result(self, where: str) -> tuple[Optional[torch.Tensor], Optional[int]]:
        """After the solve: (weights kept float, for QuantLinear's float_cols; the linear's storage bits)."""
        return None, None


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, args: QuantArgs, opts: GPTQOptions, where: str = "",
                  keep: Optional[torch.Tensor] = None, hook: Optional[SolverHook] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns (Q, scale, zero, g_idx): Q the dequantized weight; scale/zero one per row of grouped(W)
    (or [out, groups] with g_idx, when act order permutes the groups). H is consumed: it is modified,
    and released as soon as its factor exists when the caller holds no other reference. The input
    columns in `keep` (OWQ) are quantized last, i.e. not at all: Q holds their error-compensated float values,
    and the groups are formed over the other columns in order (so g_idx is returned for per_group)."""
    W = W.float().clone()
    H = H.float()
    if args.quant_type == "nvfp4" and args.global_scale is None:  # one global scale, from the weight as given
        args = bind_global(args, W)
    rows, cols = W.shape
    gs = args.group_size if args.granularity == "per_group" else cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if keep is not None and opts.static_groups:
        raise ValueError("OWQ's groups are formed over the non-weak columns: static_groups is not available")
    n_q = cols - (len(keep) if keep is not None else 0)

    static = None
    if args.granularity != "per_group":
        kept = W
        if keep is not None:
            mask = torch.ones(cols, dtype=torch.bool, device=W.device)
            mask[keep] = False
            kept = W[:, mask]
        whole = kept if args.granularity == "per_channel" else kept.reshape(1, -1)
        scale, zero = calibrate(whole, args)
        static = [(scale.expand(rows, 1) if scale.shape[0] == 1 else scale,
                   zero.expand(rows, 1) if zero.shape[0] == 1 else zero)]
    elif opts.static_groups:
        static = [calibrate(W[:, g:g + gs], args) for g in range(0, cols, gs)]

    perm = None
    if keep is not None:
        mask = torch.ones(cols, dtype=torch.bool, device=W.device)
        mask[keep] = False
        rest = torch.nonzero(mask).flatten()
        if opts.actorder:
            rest = rest[torch.argsort(torch.diag(H)[rest], descending=True)]
        perm = torch.cat([rest, keep.to(rest)])
    elif opts.actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
    if perm is not None:
        W, H = W[:, perm], H[perm[:, None], perm]
    Hinv = inverse_hessian_factor(H, opts.percdamp, where)
    del H
    if hook is not None:
        hook.start(W, Hinv, perm)

    Q = torch.zeros_like(W)
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    current = None
    if static is not None:  # the static group of each (possibly permuted) column
        originals = perm.tolist() if perm is not None else range(cols)
        static_of = [static[0] if args.granularity != "per_group" else static[c // gs] for c in originals]
    for i1 in range(0, n_q, opts.blocksize):
        i2 = min(i1 + opts.blocksize, n_q)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                current = static_of[col]
            elif col % gs == 0:
                stop = min(col + gs, n_q)
                if hook is None:
                    # As the reference: the group's range comes from W, which holds the updates of earlier blocks.
                    current = calibrate(W[:, col:stop], args)
                else:  # as SpQR's reference: the group as it stands, this block's updates included
                    G = W[:, col:stop].clone()
                    inside = min(stop, i2) - col
                    G[:, :inside] = W1[:, i:i + inside]
                    current = hook.group(G, col, torch.diag(Hinv)[col:stop], args)
                found.append(current)
            w = W1[:, i:i + 1]
            q = dequantize(quantize(w, current[0], current[1], args), current[0], current[1])
            if hook is not None:
                q = hook.column(col, w[:, 0], q[:, 0], Hinv1[i, i])[:, None]
            Q[:, col] = q[:, 0]
            err = (w - q)[:, 0] / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q[:, n_q:] = W[:, n_q:]  # OWQ's weak columns: float, with the error updates they received

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if static is None:  # groups were formed in permuted order: column j belongs to group inv[j] // gs
            g_idx = torch.div(inv, gs, rounding_mode="floor")
            if keep is not None:
                g_idx[keep] = 0  # float columns: any valid group (their grid is never used)
    groups = static if static is not None and args.granularity == "per_group" else found or static
    scale = torch.cat([g[0] for g in groups], dim=1)
    zero = torch.cat([g[1] for g in groups], dim=1)
    if g_idx is None:
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        if args.granularity == "per_tensor":
            scale, zero = scale[:1], zero[:1]
    return Q, scale, zero, g_idx


@ALGORITHMS.register("GPTQ")
class GPTQ(Algorithm):
    name = "GPTQ"
    Options = GPTQOptions
    mixes_bits = True
    data_driven = True
    batch_invariant = True

    @classmethod
    def check(cls, config) -> None:
        opts = GPTQOptions.model_validate(config.quant.special)
        if not opts.owq:
            if opts.n_outs is not None:
                raise ConfigError("quant.special.n_outs", f"{opts.n_outs} without owq: True; set owq: True (OWQ) "
                                  "or remove n_outs")
            return
        if opts.n_outs is None:
            raise ConfigError("quant.special.n_outs", "is required with owq: True: the number of float input "
                              "columns per linear (a list in the block's linear order, or one count)")
        counts = opts.n_outs if isinstance(opts.n_outs, list) else [opts.n_outs]
        if any(n < 0 for n in counts):
            raise ConfigError("quant.special.n_outs", f"{opts.n_outs}: counts must be >= 0")
        if opts.static_groups:
            raise ConfigError("quant.special.static_groups", "True with owq: True: OWQ forms its groups over the "
                              "columns it quantizes, after choosing the weak ones; set static_groups: False")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        opts = GPTQOptions.model_validate(config.quant.special)
        if not opts.owq:
            return
        names = adapter.linear_names()
        if isinstance(opts.n_outs, list) and len(opts.n_outs) != len(names):
            raise ConfigError("quant.special.n_outs", f"{opts.n_outs} has {len(opts.n_outs)} entries; this model's "
                              f"blocks have {len(names)} linears ({', '.join(names)}): one count each, in that order")
        for i, block in enumerate(adapter.block_list()):
            for k, name in enumerate(names):
                n_out, width = n_out_of(opts, k), block.get_submodule(name).in_features
                if n_out >= width:
                    raise ConfigError("quant.special.n_outs", f"{n_out} float columns for "
                                      f"{adapter.block_name(i)}.{name}, which has {width} inputs; expected fewer")

    def __init__(self, wargs, aargs, options):
        super().__init__(wargs, aargs, options)
        if options.owq:
            how = ("H_jj x the per-channel RTN error of the column (OWQ paper)" if options.owq_sensitivity == "error"
                   else "H_jj alone (LLMC)")
            logger.info(f"GPTQ with OWQ: n_outs {options.n_outs} float input columns per linear, ranked by {how}")
        if options.chunk_num != 1:
            logger.info(f"GPTQ: chunk_num {options.chunk_num} only bounds memory in LLMC (each Hessian summed over "
                        "that many token chunks, the same sum); llmc sums it in column blocks and ignores chunk_num")

    def hessians(self, job, inputs: list[str]) -> dict[str, torch.Tensor]:
        """Each input's H; inputs fed the same tensor get the same H object (llmc/algorithms/hessian.py)."""
        sums = HessianSums()

        def add(name: str, x: torch.Tensor) -> None:
            sums.add(name, x)
            self.observe(name, x.reshape(-1, x.shape[-1]))

        job.collect(inputs, add, sums.end_batch)
        return sums.hessians(job.ctx.reduce)

    def stages(self, job) -> list[list]:
        """Subsets quantized together: one at a time under true_sequential, except subsets beside the
        previous one (experts' down projections), which read nothing it writes; else all at once."""
        if not self.options.true_sequential:
            return [list(job.subsets)]
        stages: list[list] = []
        for subset in job.subsets:
            if stages and subset.beside_previous:
                stages[-1].append(subset)
            else:
                stages.append([subset])
        return stages

    def observe(self, source: str, x: torch.Tensor) -> None:
        """Sees every calibration input [tokens, features] the Hessians are built from (QUIK's feature peaks)."""

    def solver_options(self) -> GPTQOptions:
        return self.options

    def solver_hook(self, q) -> Optional[SolverHook]:
        """A fresh hook for one linear's solve (SpQR); None: plain GPTQ."""
        return None

    def apply(self, job, targets):
        opts = self.solver_options()
        installed = {}
        for stage in self.stages(job):
            names = [n for s in stage for n in job.quantized_layers(s)]
            if not names:
                continue
            # each linear's own input (an expert's: the tokens it calibrates on)
            source = {n: s.input_of(n) for s in stage for n in job.quantized_layers(s)}
            H = self.hessians(job, sorted(set(source.values())))
            qs = {name: self.install(job, name) for name in names}
            keeps = {n: self.weak_columns(job, n, qs[n].weight.data, H[source[n]]) for n in names}
            hooks = {n: self.solver_hook(qs[n]) for n in names}
            groups = self.solve_groups(qs, {n: H[source[n]] for n in names},
                                       {n: keeps[n] is not None or hooks[n] is not None for n in names})
            uses = Counter(id(H[source[g[0]]]) for g in groups)

            def take(name: str) -> torch.Tensor:
                """The name's H for one solve: a copy while a later solve reads it, else the one (whose
                references are dropped, so the solve can free it once its factor exists)."""
                hessian = H[source[name]]
                uses[id(hessian)] -= 1
                if uses[id(hessian)]:
                    return hessian.clone()
                for key in [k for k, v in H.items() if v is hessian]:
                    del H[key]
                return hessian

            for group in groups:
                owner = job.ctx.owner(len(installed))  # data-parallel: one rank solves, all receive
                found = None
                if job.ctx.shard.rank != owner:
                    take(group[0])
                elif len(group) == 1:
                    name = group[0]
                    q, keep, hook = qs[name], keeps[name], hooks[name]
                    found = [(*gptq_quantize(q.weight.data, take(name), q.wargs, opts, job.full_name(name), keep, hook),
                              *((keep, None) if hook is None else hook.result(job.full_name(name))))]
                else:
                    where = f"{job.full_name(group[0])} and {len(group) - 1} more reading the same input"
                    found = stacked_gptq([qs[n].weight.data for n in group], take(group[0]), qs[group[0]].wargs,
                                         opts, where)
                flat = job.ctx.share(tuple(t for one in found for t in one) if found else None, owner)
                for k, name in enumerate(group):
                    Q, scale, zero, g_idx, keep, bits = flat[6 * k:6 * k + 6]
                    q = qs[name]
                    q.weight.data.copy_(Q.to(q.weight.dtype))
                    q.set_weight_qparams(scale, zero, g_idx, float_cols=keep)
                    q.storage_bits = bits
                    installed[name] = q
        self.calibrate_static_acts(job, installed)
        return {}

    def solve_groups(self, qs: dict, hessians: dict[str, torch.Tensor], own: dict[str, bool]) -> list[list[str]]:
        """The stage's linears (name → installed QuantLinear) in solves: linears reading the same input with
        the same grid are stacked row-wise (up to STACK_ELEMENTS weights a solve), since GPTQ treats each
        row on its own given H; a grid with a statistic over the whole tensor (per_tensor, NVFP4's global
        scale), or a solve of its own (`own`: OWQ's or QUIK's float columns, SpQR's hook) is solved alone."""
        runs: dict[tuple, list[str]] = {}
        order: list[list[str]] = []
        for name, q in qs.items():
            args, size = q.wargs, q.weight.numel()
            alone = own[name] or args.granularity not in ("per_channel", "per_group") \
                or args.quant_type == "nvfp4"
            key = (id(hessians[name]), q.weight.shape[1], args)
            run = runs.get(key)
            if alone or run is None or sum(qs[n].weight.numel() for n in run) + size > STACK_ELEMENTS:
                runs[key] = [name]
                order.append(runs[key])
            else:
                run.append(name)
        return order

    def weak_columns(self, job, name: str, W: torch.Tensor, H: torch.Tensor) -> Optional[torch.Tensor]:
        opts: GPTQOptions = self.options
        if not opts.owq:
            return None
        n_out = n_out_of(opts, [n for s in job.subsets for n in s.layers].index(name))
        return weak_columns(W, H, n_out, self.args_of(job, name)[0], opts.owq_sensitivity) if n_out else None


def n_out_of(opts: GPTQOptions, index: int) -> int:
    """The float column count of the index-th linear of a block."""
    return opts.n_outs[index] if isinstance(opts.n_outs, list) else opts.n_outs
