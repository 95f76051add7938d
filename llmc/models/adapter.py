"""Model adapters declare structure only: where the blocks are, what surrounds them, and per block the
ordered subsets of linears that share one input (with the op in front of them that can absorb a scale)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

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
    # QuaRot's rotation of the residual stream (llmc/algorithms/quarot.py): the kind of the norms in front of
    # the subsets ("rms": x / rms(x) * w, which commutes with a rotation once w is folded; "layer": mean
    # subtraction, which does not; None: undeclared), the token embedding, the value projection and the
    # linears that write the residual stream (attention output, MLP output).
    norm_kind: ClassVar[Optional[str]] = None
    embed_tokens: ClassVar[Optional[str]] = None
    attn_value: ClassVar[Optional[str]] = None
    attn_out: ClassVar[Optional[str]] = None
    mlp_out: ClassVar[Optional[str]] = None

    def __init__(self, model: nn.Module):
        self.model = model

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

    def linear_names(self) -> list[str]:
        return [name for subset in self.subsets for name in subset.layers]

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
LLMC_TYPES = {"smollm": "llama"}


def _normal(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def adapter_class(model_type: Optional[str], declared: Optional[str]) -> type[Adapter]:
    """The adapter for an HF `model_type`. A declared `model.type` (LLMC's spellings: Llama, Qwen2,
    DeepseekV3, ... case-insensitively) must name the checkpoint's own model_type: a family's layout
    decides whether a fold keeps the float model, so a checkpoint is never run under another family's."""
    import llmc.models.families  # noqa: F401  (registration)

    supported = ", ".join(ADAPTERS.names())
    if declared is not None:
        wanted = LLMC_TYPES.get(_normal(declared), _normal(declared))
        if model_type is None or wanted != _normal(model_type):
            raise ConfigError("model.type", f"'{declared}' does not match the checkpoint's model_type "
                              f"'{model_type}' (config.json). Remove model.type to use the checkpoint's, or point "
                              f"model.path at a {declared} checkpoint. Supported model types: {supported}")
    if model_type not in ADAPTERS:
        raise ConfigError("model.type" if declared else "model.path",
                          f"no adapter for the checkpoint's model_type '{model_type}'. Supported: {supported}")
    return ADAPTERS.get(model_type)
