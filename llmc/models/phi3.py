"""Phi-3 and Phi-4 (model_type phi3): the Llama layout with fused projections, self_attn.qkv_proj (rows
q, then k, then v) and mlp.gate_up_proj (rows gate, then up).

o_proj reads attention over v, so its scale folds into v's rows of qkv_proj only; down_proj reads
act(gate) · up, so its scale folds into up's rows of gate_up_proj only (`prev_rows`, from the config).
qkv_proj's outputs include the attention scores' q and k, so weight clipping skips it."""
from dataclasses import replace

from llmc.models.adapter import Adapter, Subset
from llmc.registry import ADAPTERS


@ADAPTERS.register("phi3")
class Phi3(Adapter):
    blocks = "model.layers"
    embeddings = ["model.embed_tokens", "model.rotary_emb"]
    final = ["model.norm"]
    score_layers = ("self_attn.qkv_proj",)
    norm_kind, embed_tokens = "rms", "model.embed_tokens"
    attn_out, mlp_out = "self_attn.o_proj", "mlp.down_proj"  # no attn_value: v is part of the fused qkv_proj
    subsets = [
        Subset(layers=("self_attn.qkv_proj",), prev_op="input_layernorm", input="self_attn.qkv_proj",
               inspect="self_attn", has_kwargs=True, shiftable=True),
        Subset(layers=("self_attn.o_proj",), prev_op="self_attn.qkv_proj", input="self_attn.o_proj",
               inspect="self_attn.o_proj", shiftable=True),
        Subset(layers=("mlp.gate_up_proj",), prev_op="post_attention_layernorm", input="mlp.gate_up_proj",
               inspect="mlp", shiftable=True),
        Subset(layers=("mlp.down_proj",), prev_op="mlp.gate_up_proj", input="mlp.down_proj", inspect="mlp.down_proj"),
    ]

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        hd = self.head_dim()
        q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
        rows = {"self_attn.qkv_proj": (q + kv, q + 2 * kv), "mlp.gate_up_proj": (inter, 2 * inter)}
        self.subsets = [replace(s, prev_rows=rows[s.prev_op]) if s.prev_op in rows else s for s in type(self).subsets]
