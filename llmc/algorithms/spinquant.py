"""SpinQuant (Liu et al., 2024): QuaRot with a learned residual rotation.

QuaRot's random Hadamard is one orthogonal matrix among many, and some rotate the outliers away better than
others. SpinQuant starts from it (R1) and learns R1 on the calibration loss: the model's next-token cross
entropy with every quantized linear's input fake-quantized (straight-through) and weights kept float, as the
paper trains its rotations before GPTQ. R1 stays orthogonal throughout: each step is a Cayley retraction
along the Riemannian gradient (Li et al., 2020's Cayley SGD, with its step cap 1/‖A‖ and linear decay).
The paper's lr 1.5 always hits that cap, moving R1 by ~1 in Frobenius norm per step: on SmolLM2 (576 wide,
one 512-token sample per step, 30 steps, W4A4 RTN, 8 x 2048 windows) that gave PPL 175.6 against QuaRot's
131.2, and lr 0.02 (the default here) 127.4.

While learning, nothing is folded: forward hooks rotate the residual stream (embedding outputs and the
outputs of o_proj/down_proj by R1) and undo it on the readers' inputs (after their activation quantizer),
which, with the residual norms' scales folded, computes exactly the rotated model. Afterwards R1 is made
orthogonal in float64 (polar factor) and folded as QuaRot folds its Hadamard, so the float model is kept.
Online Hadamards (`online_rotate`: down_proj, o_proj) are applied before learning, so the loss sees them.
Forwards run under autocast in `model.compute_dtype`; R1 and the loss stay float32.
R2 (the per-head value rotation) stays QuaRot's Hadamard: not learned here.
"""
from __future__ import annotations

import torch
from loguru import logger
from pydantic import Field
from torch import nn
from tqdm import tqdm

from llmc.algorithms.minibatch import token_batches
from llmc.algorithms.quarot import Quarot, QuarotOptions, residual_readers, residual_writers, rotate_model
from llmc.errors import ConfigError, UserError
from llmc.models.adapter import get_module
from llmc.quant.quantizer import fake_quant
from llmc.registry import ALGORITHMS


class SpinQuantOptions(QuarotOptions):
    iters: int = Field(100, ge=1)        # rotation updates
    lr: float = Field(0.02, gt=0)        # Cayley SGD step, decayed linearly to 0 (see the module docstring)
    batch_size: int = Field(1, ge=1)     # calibration samples per update


def _ste_quant(x: torch.Tensor, args) -> torch.Tensor:
    """Fake-quantized forward, identity gradient."""
    return x + (fake_quant(x.detach(), args) - x.detach())


class RotationHooks:
    """The rotated model computed on the unrotated weights: h·R on the residual stream, readers fed
    quant(x)·Rᵀ, every other quantized linear's input fake-quantized."""

    def __init__(self, model, adapter, r: torch.Tensor, act_args):
        self.r, self.act_args, self.handles = r, act_args, []
        hook = self.handles.append
        hook(get_module(model, adapter.embed_tokens).register_forward_hook(self._rotate_output))
        hook(get_module(model, adapter.lm_head).register_forward_pre_hook(self._unrotate))
        for i, block in enumerate(adapter.block_list()):
            readers = [m for linears in residual_readers(block, adapter, i).values() for m in linears]
            quantized = {id(get_module(block, n)) for n in adapter.block_linear_names(i)}
            for lin in readers:
                hook(lin.register_forward_pre_hook(self._quant_unrotate if id(lin) in quantized else self._unrotate))
            for name in residual_writers(adapter, i):
                hook(get_module(block, name).register_forward_hook(self._rotate_output))
            for name in adapter.block_linear_names(i):
                if all(get_module(block, name) is not m for m in readers) and act_args is not None:
                    hook(get_module(block, name).register_forward_pre_hook(self._quant))

    def _rotate_output(self, module, args, out):
        return out @ self.r.to(out.dtype)

    def _unrotate(self, module, args):
        return (args[0] @ self.r.to(args[0].dtype).T,) + tuple(args[1:])

    def _quant_unrotate(self, module, args):
        x = _ste_quant(args[0], self.act_args) if self.act_args is not None else args[0]
        return (x @ self.r.to(x.dtype).T,) + tuple(args[1:])

    def _quant(self, module, args):
        return (_ste_quant(args[0], self.act_args),) + tuple(args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
    """One Cayley SGD step on the orthogonal group: A = G·Rᵀ − R·Gᵀ (skew), α = min(lr, 1/‖A‖),
    R ← (I + α/2·A)⁻¹ (I − α/2·A) R, orthogonal whenever R is; returns (R, α)."""
    a = grad @ r.T - r @ grad.T
    alpha = min(lr, 1.0 / (a.norm().item() + 1e-8))
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + alpha / 2 * a, (eye - alpha / 2 * a) @ r), alpha


def polar(r: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest r (float64)."""
    u, _, vh = torch.linalg.svd(r.double())
    return u @ vh


@ALGORITHMS.register("SpinQuant")
class SpinQuant(Quarot):
    name = "SpinQuant"
    Options = SpinQuantOptions
    data_driven = True

    @classmethod
    def needs_block_inputs(cls, wargs, aargs, options) -> bool:
        return bool(aargs and aargs.static)  # the samples serve the rotation; RTN needs them only for static acts

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.quant.act is None:
            raise ConfigError("quant.act", "missing: SpinQuant learns its rotation against quantized activations "
                              "(weights stay float while it learns); for weight-only use Quarot")

    def prepare_model(self, model, adapter, ctx, batches=None) -> None:
        if ctx.world_size > 1:
            raise UserError("SpinQuant learns one rotation on all calibration samples in one process; run it "
                            "without torchrun (or learn it once and continue with GPTQ on several processes)")
        rows = [row for b in batches or [] for row in b]
        if not rows:
            raise UserError("SpinQuant: no calibration samples to learn the rotation on (give a calib section)")
        hidden = self.fold_norms(model, adapter, ctx)
        if self.options.online_rotate:  # before learning, so the loss sees the activations the model will have
            with torch.no_grad():
                for i, block in enumerate(adapter.block_list()):
                    self.online_rotations(block, i)
            self.online_done = True
        gen = torch.Generator().manual_seed(ctx.seed)
        mode = self.options.rotate_mode
        r0 = self.initial_rotation(hidden, gen)
        r = self.learn(model, adapter, ctx, rows, r0, gen)
        logger.info(f"SpinQuant: residual stream rotated by the learned R1 (from a {mode} start, seed {ctx.seed}; "
                    f"moved {(r - r0.to(r.device)).norm().item():.3f} in Frobenius norm)")
        rotate_model(model, adapter, ctx, r)

    def learn(self, model, adapter, ctx, rows: list[torch.Tensor], r0: torch.Tensor, gen) -> torch.Tensor:
        opts: SpinQuantOptions = self.options
        r = r0.to(ctx.device, torch.float32).requires_grad_(True)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        hooks = RotationHooks(model, adapter, r, self.aargs)
        losses, alphas = [], []
        try:
            batches = token_batches(rows, opts.batch_size, opts.iters, gen)
            for step, ids in enumerate(tqdm(batches, total=opts.iters, desc="SpinQuant R1", unit="step")):
                ids = ids.to(ctx.device)
                with ctx.autocast():
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
                loss.backward()
                with torch.no_grad():
                    rotated, alpha = cayley_step(r, r.grad.float(), opts.lr * (1 - step / opts.iters))
                    r.copy_(rotated)
                r.grad = None
                losses.append(loss.item())
                alphas.append(alpha)
                if (step + 1) % max(1, opts.iters // 10) == 0:
                    window = losses[-max(1, opts.iters // 10):]
                    logger.info(f"SpinQuant step {step + 1}/{opts.iters}: loss {sum(window) / len(window):.4f} "
                                f"(mean over the last {len(window)} steps; step size {alphas[-1]:.3g})")
        finally:
            hooks.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
        self.losses = losses
        return polar(r.detach())
