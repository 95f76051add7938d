"""Mixtral: Mistral attention and 8 routed experts per block, each expert's linears named w1 (gate),
w3 (up), w2 (down) as in its checkpoints."""
from llmc.models.qwen3_moe import Qwen3Moe
from llmc.registry import ADAPTERS


@ADAPTERS.register("mixtral")
class Mixtral(Qwen3Moe):
    expert_linears = ("w1", "w3", "w2")
    checkpoint_renames = ((".mlp.", ".block_sparse_moe."),)  # transformers saves Mixtral's MoE under that name
