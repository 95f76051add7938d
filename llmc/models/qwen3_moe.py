"""Qwen3-MoE: Llama-style attention (with q/k norms after the projections) and routed experts; blocks in
`mlp_only_layers` (or off `decoder_sparse_step`) keep a dense MLP."""
from llmc.models.llama import Llama
from llmc.models.moe import MoeAdapter
from llmc.registry import ADAPTERS


@ADAPTERS.register("qwen3_moe")
class Qwen3Moe(MoeAdapter):
    blocks = Llama.blocks
    embeddings = Llama.embeddings
    final = Llama.final
    attention_subsets = Llama.subsets[:2]
    dense_subsets = Llama.subsets[2:]
    norm_kind, embed_tokens = Llama.norm_kind, Llama.embed_tokens
    attn_value, attn_out, mlp_out = Llama.attn_value, Llama.attn_out, Llama.mlp_out
