"""Model adapters declare structure only: where the blocks are, what surrounds them, and per block the
ordered subsets of linears that share one input (with the op in front of them that can absorb a scale)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from llmc.errors import ConfigError
from llmc.registry import ADAPTERS


@dataclass(frozen=True)
class Subset:
    layers: tuple[str, ...]        # linears fed by the same input, names relative to the block
    prev_op: Optional[str]         # norm or linear whose output is that input (None: nothing can absorb a scale)
    input: str                     # the linear whose input is captured for the subset
    inspect: str                   # module whose output measures a transform's error
    has_kwargs: bool = False       # inspect needs the block's kwargs (attention mask, rotary embeddings)
    shiftable: bool = False        # input = prev_op's output up to a per-channel affine map (a shift folds)
    prev_rows: Optional[tuple[int, int]] = None  # only these output rows of prev_op feed the subset (a fused linear)
    prev_offset: float = 0.0       # prev_op is a norm computing x̂·(prev_offset + w) (Gemma: 1)
    # Float modules that also read prev_op's output (a MoE router, a shared-expert gate): a fold multiplies
    # their weight columns by the same scale, so they compute exactly what they did.
    readers: tuple[str, ...] = ()
    # Per layer, the module whose input is that layer's own input when it differs from `input` (an expert
    # reads only the tokens routed to it); empty: every layer reads `input`.
    layer_inputs: tuple[str, ...] = ()
    # Reads nothing the previous subset's layers write (the next expert's down beside this one's): a
    # sequential pass may calibrate the two from one block forward.
    beside_previous: bool = False

    def input_of(self, layer: str) -> str:
        return self.layer_inputs[self.layers.index(layer)] if self.layer_inputs else self.input


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(get_module(root, parent), leaf, module)


class Adapter:
    """Structure of one model family; subclasses only fill in the class attributes."""

    blocks: ClassVar[str]                 # the ModuleList of decoder blocks
    backbone: ClassVar[str] = "model"     # module whose forward runs embeddings → blocks → final norm
    embeddings: ClassVar[list[str]]
    final: ClassVar[list[str]]            # final norm (and projections) applied after the last block
    lm_head: ClassVar[str] = "lm_head"
    subsets: ClassVar[list[Subset]]
    # Linears whose outputs are multiplied into attention scores: weight clipping skips them (as AutoAWQ).
    score_layers: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj")
    attention: ClassVar[str] = "self_attn"  # the module in each block that computes attention
    # MoE: the fused experts module in a block (transformers 5's 3-D gate_up_proj/down_proj) and the names
    # of each expert's (gate, up, down) linears after `prepare` unfuses it (llmc/models/moe.py).
    experts: ClassVar[Optional[str]] = None
    expert_linears: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # (module name part, checkpoint name part) where the checkpoint on disk names a block's tensors otherwise
    # (read by model.offload, which loads blocks from the shards by name)
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # QuaRot's rotation of the residual stream (llmc/algorithms/quarot.py): the kind of the norms in front of
    # the subsets ("rms": x / rms(x) * w, which commutes with a rotation once w is folded; "layer": mean
    # subtraction, which does not; "sandwich": RMSNorms also between o_proj/down_proj and the residual,
    # whose scales fold nowhere; None: undeclared), the block norms that read the residual stream, the
    # token embedding, the value projection (None where values are not a plain per-head linear: fused qkv,
    # MLA) and the linears that write the residual stream (attention output, MLP output).
    norm_kind: ClassVar[Optional[str]] = None
    residual_norms: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm")
    embed_tokens: ClassVar[Optional[str]] = None
    attn_value: ClassVar[Optional[str]] = None
    attn_out: ClassVar[Optional[str]] = None
    mlp_out: ClassVar[Optional[str]] = None

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def prepare(cls, model: nn.Module) -> nn.Module:
        """Make the loaded (or meta) model quantizable: fused experts become one linear per expert matrix."""
        if cls.experts is not None:
            from llmc.models.moe import unfuse_experts

            unfuse_experts(get_module(model, cls.blocks), cls.experts, cls.expert_linears)
        return model

    def block_subsets(self, index: int) -> list[Subset]:
        """The subsets of block `index` (MoE models mix dense and expert blocks)."""
        return self.subsets

    def mlp_outs(self, index: int) -> list[str]:
        """The linears of block `index` that write the MLP's output to the residual stream, each reading
        act(gate) · up (MoE: every expert's down linear and the shared expert's)."""
        return [self.mlp_out] if self.mlp_out else []

    def block_linear_names(self, index: int) -> list[str]:
        return [name for subset in self.block_subsets(index) for name in subset.layers]

    def block_list(self) -> nn.ModuleList:
        return get_module(self.model, self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    def attention_modules(self) -> list[nn.Module]:
        return [get_module(block, self.attention) for block in self.block_list()]

    def head_dim(self) -> Optional[int]:
        cfg = self.model.config
        heads = getattr(cfg, "num_attention_heads", None)
        return getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the final hidden states: lm_head, then the final soft-capping some
        families apply (Gemma 2: c·tanh(logits / c))."""
        logits = get_module(self.model, self.lm_head)(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def linear_names(self) -> list[str]:
        """Every block's quantized linear names, each once, in block order."""
        names = dict.fromkeys(n for i in range(len(self.block_list())) for n in self.block_linear_names(i))
        return list(names)

    def present(self, names: list[str]) -> list[str]:
        """Names that exist on this model (e.g. OPT's project_in exists only for some sizes)."""
        out = []
        for name in names:
            try:
                if get_module(self.model, name) is not None:
                    out.append(name)
            except AttributeError:
                pass
        return out


# LLMC's `model.type` names whose spelling is not the HF model_type with case and underscores dropped.
LLMC_TYPES = {"smollm": "llama", "gemma3": "gemma3text"}


def _normal(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def adapter_class(model_type: Optional[str], declared: Optional[str]) -> type[Adapter]:
    """The adapter for an HF `model_type`. A declared `model.type` (LLMC's spellings: Llama, Qwen2,
    DeepseekV3, ... case-insensitively) must name the checkpoint's own model_type: a family's layout
    decides whether a fold keeps the float model, so a checkpoint is never run under another family's."""
    import llmc.models.families  # noqa: F401  (registration)

    supported = ", ".join(ADAPTERS.names())
    if declared is not None:
        wanted = {_normal(declared), LLMC_TYPES.get(_normal(declared))}
        if model_type is None or _normal(model_type) not in wanted:
            raise ConfigError("model.type", f"'{declared}' does not match the checkpoint's model_type "
                              f"'{model_type}' (config.json). Remove model.type to use the checkpoint's, or point "
                              f"model.path at a {declared} checkpoint. Supported model types: {supported}")
    if model_type not in ADAPTERS:
        raise ConfigError("model.type" if declared else "model.path",
                          f"no adapter for the checkpoint's model_type '{model_type}'. Supported: {supported}")
    return ADAPTERS.get(model_type)


def prepare_model(model: nn.Module) -> nn.Module:
    """The family's `prepare` (unfused experts) on a freshly built model; models without an adapter pass."""
    import llmc.models.families  # noqa: F401  (registration)

    model_type = getattr(model.config, "model_type", None)
    return ADAPTERS.get(model_type).prepare(model) if model_type in ADAPTERS else model
