"""QuaRot (Ashkboos et al., 2024): rotate the model so its activations lose their outlier channels, then
quantize weights (RTN; GPTQ in a second stage) and per-token activations.

Offline, before the blockwise pass (`prepare_model`, the whole model at once): tied embeddings are untied;
every RMSNorm's scale is folded into the linears it feeds (norm weights become 1); the residual stream is
rotated by an orthogonal Q (a randomised Hadamard, or the QR of a Gaussian, seeded from base.seed):
embeddings E·Q, the linears reading the stream W·Q (q/k/v, gate/up, lm_head), the linears writing it Qᵀ·W
(o_proj, down_proj: every expert's in MoE blocks; biases too), and the MoE router and shared-expert gate,
which read the same norm. MLA's latent norms sit inside attention and stay. RMSNorm(xQ) = RMSNorm(x)Q once
its scale is folded, so the float model is unchanged. LayerNorm's mean subtraction does not commute with Q: those families are refused.

Online (`online_rotate`, per block in `apply`): a Hadamard H on down_proj's input (H folded into its weight,
applied to the input in the forward, before the activation quantizer) and QuaRot's value/output rotation:
a Hadamard per head folded into v_proj's outputs and o_proj's inputs (exact offline), plus online on o_proj's
input the Hadamard across heads (H_heads ⊗ I_head_dim), together the full Hadamard o_proj's input needs;
when no Hadamard of the head count exists (SmolLM2: 9 heads), a full Hadamard of the hidden width instead,
logged. `fp32_had` computes the online transforms in float32. They are recorded in save_trans / save_fake
outputs (llmc_rotations.json) and re-attached on load (a later GPTQ stage, `load_fake_quant`).

LLMC's (and QuaRot's) mean removal from the embeddings is not applied: with RMSNorm it changes the model.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, Options
from llmc.config.schema import PACKED_SAVES as PACKED  # every packed export refuses online rotations
from llmc.errors import ConfigError
from llmc.models.adapter import get_module
from llmc.quant.hadamard import OnlineHadamard, attach, is_hadamard_order, random_hadamard, random_orthogonal
from llmc.registry import ALGORITHMS


class QuarotOptions(Options):
    rotate_mode: Literal["hadamard", "random"] = "hadamard"
    fp32_had: bool = False  # the online Hadamards computed in float32
    online_rotate: bool = False


@torch.no_grad()
def _set(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype)
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype)


def fuse_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    """W ← W·diag(w) for each linear the norm feeds; the norm's weight becomes 1."""
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias: not an RMSNorm")
    w = norm.weight.data.double()
    for lin in linears:
        _set(lin, lin.weight.data.double() * w.to(lin.weight.device)[None, :])
    norm.weight.data.fill_(1)


def rotate_input(linear: nn.Module, q: torch.Tensor) -> None:
    """A linear reading the rotated stream h·Q: W ← W·Q."""
    _set(linear, linear.weight.data.double() @ q.to(linear.weight.device))


def rotate_output(linear: nn.Module, q: torch.Tensor) -> None:
    """A linear writing the rotated stream: W ← Qᵀ·W, b ← Qᵀ·b."""
    q = q.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.data.double() @ q
    _set(linear, q.T @ linear.weight.data.double(), bias)


def _apply_rows(rotation: OnlineHadamard, w: torch.Tensor) -> torch.Tensor:
    """The rotation applied to every row of w in float64 (whatever fp32_had says): W·Rᵀ, the weight that
    undoes R on the input."""
    return OnlineHadamard(rotation.order, rotation.block).to(w.device)(w.double())


@ALGORITHMS.register("Quarot", "QuaRot")
class Quarot(Algorithm):
    name = "Quarot"
    Options = QuarotOptions
    keeps_float = True  # the online folds of `apply` keep the block: the engine checks it
    folds = True
    online_done = False  # the online Hadamards were applied to every block before the blockwise pass

    @classmethod
    def check(cls, config) -> None:
        opts = cls.Options.model_validate(config.quant.special)
        if opts.fp32_had and not opts.online_rotate:
            logger.info("Quarot: fp32_had has no effect without online_rotate (no online Hadamard to compute)")
        if config.model.offload != "none":
            raise ConfigError("model.offload", f"{config.model.offload} with Quarot: the rotation transforms the "
                              "whole model at once before the blockwise pass; set offload: none")
        packed = [k for k in PACKED if getattr(config.save, k)]
        if opts.online_rotate and packed:
            raise ConfigError("quant.special.online_rotate", f"True with {'/'.join(packed)}: those formats cannot "
                              "hold the online Hadamards the model needs; use save_fake/save_trans, or online_rotate: "
                              "False")

    @classmethod
    def check_model(cls, config, adapter) -> None:
        opts = cls.Options.model_validate(config.quant.special)
        kind = adapter.norm_kind
        if kind != "rms" or adapter.embed_tokens is None or adapter.attn_out is None or not adapter.mlp_outs(0):
            what = {"layer": "LayerNorm subtracts the mean, which does not commute with a rotation (QuaRot would "
                             "need SliceGPT's mean baking, not exact)",
                    "sandwich": "RMSNorms sit between o_proj/down_proj and the residual stream, and their scales "
                                "fold into no linear, so the rotated model would not equal the original"
                    }.get(kind, "its adapter declares no RMSNorm layout")
            raise ConfigError("quant.method", f"Quarot on '{adapter.model.config.model_type}': {what}; QuaRot applies "
                              "exactly to RMSNorm models whose norms feed linears (Llama, Mistral, Qwen2/3, Phi-3, "
                              "the MoE families, DeepSeek)")
        sizes = {"hidden_size": adapter.model.config.hidden_size} if opts.rotate_mode == "hadamard" else {}
        if opts.online_rotate:
            blocks = adapter.block_list()
            for i, block in enumerate(blocks):
                for name in adapter.mlp_outs(i):
                    sizes.setdefault(f"{name}'s input width", get_module(block, name).in_features)
            out_width = get_module(blocks[0], adapter.attn_out).in_features
            if _head_layout(adapter, out_width)[2] != "across heads":  # a full Hadamard on o_proj's input
                sizes[f"{adapter.attn_out}'s input width"] = out_width
        for key, n in sizes.items():
            if not is_hadamard_order(n):
                raise ConfigError("quant.special.rotate_mode" if key == "hidden_size" else "quant.special.online_rotate",
                                  f"{key} {n} has no Hadamard matrix from the Sylvester and Paley constructions"
                                  + ("; use rotate_mode: random" if key == "hidden_size" else ""))

    # ---- offline: the whole model --------------------------------------------------------------------
    @torch.no_grad()
    def prepare_model(self, model, adapter, ctx, batches=None) -> None:
        hidden = self.fold_norms(model, adapter, ctx)
        q = self.initial_rotation(hidden, torch.Generator().manual_seed(ctx.seed))
        mode = self.options.rotate_mode
        logger.info(f"{self.name}: residual stream rotated by a {mode} orthogonal matrix of order {hidden} "
                    f"(seed {ctx.seed})")
        rotate_model(model, adapter, ctx, q.to(ctx.device))

    def initial_rotation(self, hidden: int, gen: torch.Generator) -> torch.Tensor:
        """The residual rotation `rotate_mode` names (float64): QuaRot's, and SpinQuant's starting point."""
        mode = self.options.rotate_mode
        return random_hadamard(hidden, gen) if mode == "hadamard" else random_orthogonal(hidden, gen)

    @torch.no_grad()
    def fold_norms(self, model, adapter, ctx) -> int:
        """Untie the embeddings, fold every residual RMSNorm's scale into the linears reading it (the final
        norm's into the head) and record the attention/MLP layout the online rotations need; returns the
        residual width."""
        embed = get_module(model, adapter.embed_tokens)
        head = get_module(model, adapter.lm_head)
        if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
            head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
            logger.info(f"{self.name}: tied embeddings untied (lm_head gets its own copy; saved with "
                        "tie_word_embeddings False)")
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        norms = [get_module(model, n) for n in adapter.present(adapter.final)
                 if getattr(get_module(model, n), "weight", None) is not None and get_module(model, n).weight.dim() == 1]
        if len(norms) != 1:
            raise ValueError(f"{self.name}: expected one final norm in {adapter.final}, found {len(norms)}")
        head.to(ctx.device)
        fuse_norm(norms[0], [head])
        blocks = adapter.block_list()
        for i in range(len(blocks)):
            block = ctx.onload(blocks[i])
            for norm, linears in residual_readers(block, adapter, i).items():  # one fold per norm: its weight → 1
                fuse_norm(get_module(block, norm), linears)
            blocks[i] = ctx.offload(block, changed=True)
        out_width = get_module(blocks[0], adapter.attn_out).in_features
        heads, head_dim, per_head = _head_layout(adapter, out_width)
        self.layout = {"value": adapter.attn_value, "out": adapter.attn_out, "heads": heads, "head_dim": head_dim,
                       "per_head": per_head, "mlp_outs": [adapter.mlp_outs(i) for i in range(len(blocks))]}
        return embed.weight.shape[1]

    # ---- online: per block ---------------------------------------------------------------------------
    @torch.no_grad()
    def online_rotations(self, block: nn.Module, index: int) -> None:
        fp32 = self.options.fp32_had
        for name in self.layout["mlp_outs"][index]:
            down = get_module(block, name)
            rot = OnlineHadamard(down.in_features, 1, fp32).to(down.weight.device)
            _set(down, _apply_rows(rot, down.weight.data))
            attach(down, rot)
        out = get_module(block, self.layout["out"])
        heads, hd, per_head = self.layout["heads"], self.layout["head_dim"], self.layout["per_head"]
        if per_head is not None:  # a Hadamard per head: v_proj's outputs and o_proj's inputs, exactly offline
            value = get_module(block, self.layout["value"])
            per_kv = OnlineHadamard(hd, 1).to(value.weight.device)
            w = _apply_rows(per_kv, value.weight.data.double().T.reshape(-1, hd)).reshape(value.in_features, -1).T
            bias = None if value.bias is None else _apply_rows(per_kv, value.bias.data.view(-1, hd)).reshape(-1)
            _set(value, w, bias)
            _set(out, _apply_rows(per_kv, out.weight.data.double().reshape(-1, hd)).reshape(out.weight.shape))
        if per_head == "across heads":
            across = OnlineHadamard(heads, hd, fp32)
        else:
            if index == 0:
                why = ("its values are not a plain per-head projection" if self.layout["value"] is None else
                       f"no Hadamard across {heads} heads of {hd} (or per head)")
                logger.info(f"Quarot: {why}: o_proj's input gets a full online Hadamard of order "
                            f"{out.in_features} instead")
            across = OnlineHadamard(out.in_features, 1, fp32)
        across = across.to(out.weight.device)
        _set(out, _apply_rows(across, out.weight.data))
        attach(out, across)

    def apply(self, job, targets):
        if self.options.online_rotate and not self.online_done:
            self.online_rotations(job.block, job.index)
            job.check_float("Quarot's online Hadamards")
        qlinears = self.install_all(job)
        for q in qlinears.values():
            q.set_weight_qparams()
        self.calibrate_static_acts(job, qlinears)
        return {}


def residual_readers(block: nn.Module, adapter, index: int) -> dict[str, list[nn.Module]]:
    """{residual norm: every linear reading its output} of one block (MoE routers and shared-expert gates
    included: they read the same norm)."""
    readers: dict[str, list[nn.Module]] = {}
    for subset in adapter.block_subsets(index):
        if subset.prev_op in adapter.residual_norms:
            names = [*subset.layers, *(r for r in subset.readers if _has(block, r))]
            readers.setdefault(subset.prev_op, []).extend(get_module(block, n) for n in names)
    return readers


def residual_writers(adapter, index: int) -> list[str]:
    return [adapter.attn_out, *adapter.mlp_outs(index)]


@torch.no_grad()
def rotate_model(model, adapter, ctx, q: torch.Tensor) -> None:
    """Rotate the residual stream of a model whose residual norms are folded (weights 1): h → h·Q."""
    head = get_module(model, adapter.lm_head)
    embed = get_module(model, adapter.embed_tokens)
    rotate_input(head, q)
    embed.weight.data = (embed.weight.data.double() @ q.to(embed.weight.device)).to(embed.weight.dtype)
    blocks = adapter.block_list()
    for i in range(len(blocks)):
        block = ctx.onload(blocks[i])
        for linears in residual_readers(block, adapter, i).values():
            for lin in linears:
                rotate_input(lin, q)
        for name in residual_writers(adapter, i):
            rotate_output(get_module(block, name), q)
        blocks[i] = ctx.offload(block, changed=True)


def _has(block: nn.Module, name: str) -> bool:
    try:
        return get_module(block, name) is not None
    except AttributeError:
        return False


def _head_layout(adapter, out_width: int) -> tuple[int, int, Optional[str]]:
    """(heads, head_dim, how o_proj's input is rotated): "across heads" (a Hadamard per head folded into the
    value rows, and one across heads online), "per head" (per head folded, a full one online), or None (a
    full online Hadamard only: no plain value projection, or no Hadamard of the head width)."""
    heads = adapter.model.config.num_attention_heads
    hd = out_width // heads
    if adapter.attn_value is None or not is_hadamard_order(hd):
        return heads, hd, None
    return heads, hd, "across heads" if is_hadamard_order(heads) else "per head"


def _record_of(model_path: str, gguf_file) -> dict:
    from llmc.export.save import read_rotation_record
    from llmc.models.load import resolve_source

    try:
        source = resolve_source(model_path, gguf_file)
    except Exception:  # noqa: BLE001  (a bad path is reported by the model checks)
        return {}
    return {} if source.gguf_file else read_rotation_record(source.folder)


def check_online_rotate(config) -> None:
    """`online_rotate` / `fp32_had` in a later method's special section (LLMC's GPTQ step after QuaRot) state
    that the model carries QuaRot's online Hadamards: they must agree with what the checkpoint records or an
    earlier Quarot stage installs, since the folded weights are wrong without them."""
    recorded = _record_of(config.model.path, config.model.gguf_file)
    fp32 = {s["fp32"] for s in recorded.values()}
    if recorded and config.model.offload != "none":
        raise ConfigError("model.offload", f"{config.model.offload}: the checkpoint carries online rotations "
                          "(llmc_rotations.json), which streamed blocks do not keep yet; set offload: none")
    prefix = "quant" if not config.stages else None
    for i, q in enumerate(config.stages or [config.quant]):
        key = prefix or f"stages.{i}"
        if q.method.lower() in ("quarot", "spinquant"):
            if recorded:
                raise ConfigError("quant.method" if prefix else f"{key}.method", f"{q.method} on a checkpoint that "
                                  "is already rotated (it records online rotations): rotate the original model")
            if q.special.get("online_rotate"):
                recorded = {"earlier stage": {}}
                fp32 = {bool(q.special.get("fp32_had", False))}
            continue
        if "online_rotate" not in q.special and "fp32_had" not in q.special:
            if recorded:
                logger.info(f"{key}: the model carries online Hadamards (QuaRot); they stay applied")
            continue
        wanted = bool(q.special.get("online_rotate", False))
        if wanted != bool(recorded):
            where = ("the model at model.path records online rotations (llmc_rotations.json)" if recorded else
                     "neither the checkpoint nor an earlier Quarot stage has online rotations")
            raise ConfigError(f"{key}.special.online_rotate", f"{wanted}, but {where}; it must say what the model "
                              "carries (True after Quarot with online_rotate: True)")
        if wanted and "fp32_had" in q.special and {bool(q.special["fp32_had"])} != fp32:
            raise ConfigError(f"{key}.special.fp32_had", f"{q.special['fp32_had']}, but the online Hadamards were "
                              f"made with fp32_had {sorted(fp32)[0] if len(fp32) == 1 else sorted(fp32)}; they are "
                              "applied as recorded, so set the same")
