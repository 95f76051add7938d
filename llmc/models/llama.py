"""Llama-style decoders: Llama 2/3, SmolLM/SmolLM2, Mistral."""
from llmc.models.adapter import Adapter, Subset
from llmc.registry import ADAPTERS


@ADAPTERS.register("llama", "mistral")
class Llama(Adapter):
    blocks = "model.layers"
    embeddings = ["model.embed_tokens", "model.rotary_emb"]
    final = ["model.norm"]
    norm_kind = "rms"
    embed_tokens = "model.embed_tokens"
    attn_value, attn_out, mlp_out = "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"
    subsets = [
        Subset(layers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), prev_op="input_layernorm",
               input="self_attn.q_proj", inspect="self_attn", has_kwargs=True, shiftable=True),
        Subset(layers=("self_attn.o_proj",), prev_op="self_attn.v_proj", input="self_attn.o_proj",
               inspect="self_attn.o_proj", shiftable=True),
        Subset(layers=("mlp.gate_proj", "mlp.up_proj"), prev_op="post_attention_layernorm",
               input="mlp.gate_proj", inspect="mlp", shiftable=True),
        Subset(layers=("mlp.down_proj",), prev_op="mlp.up_proj", input="mlp.down_proj", inspect="mlp.down_proj"),
    ]
