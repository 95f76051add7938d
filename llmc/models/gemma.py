"""Gemma 2 and Gemma 3 (text): RMSNorms that multiply by (1 + w), and sandwich norms around attention and
the MLP (input_layernorm → q/k/v, o_proj → post_attention_layernorm → residual, pre_feedforward_layernorm →
gate/up, down_proj → post_feedforward_layernorm → residual). A scale s folds into such a norm as
w' = (1 + w) / s - 1 (`prev_offset`). The norms after o_proj and down_proj sit between those linears and
the residual, so nothing folds into their rows. Logit soft-capping (Gemma 2) is applied by
Adapter.logits; sliding-window and full-attention layers each get their own mask and rotary embeddings,
captured per block. Gemma 3 adds per-head q_norm/k_norm (nothing may scale q/k rows: none does)."""
from llmc.models.adapter import Adapter, Subset
from llmc.registry import ADAPTERS

OFFSET = 1.0  # Gemma's RMSNorm computes x̂ · (1 + w)


@ADAPTERS.register("gemma2", "gemma3_text")
class Gemma(Adapter):
    blocks = "model.layers"
    embeddings = ["model.embed_tokens", "model.rotary_emb"]
    final = ["model.norm"]
    norm_kind = "sandwich"
    subsets = [
        Subset(layers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), prev_op="input_layernorm",
               input="self_attn.q_proj", inspect="self_attn", has_kwargs=True, prev_offset=OFFSET),
        Subset(layers=("self_attn.o_proj",), prev_op="self_attn.v_proj", input="self_attn.o_proj",
               inspect="self_attn.o_proj", shiftable=True),
        Subset(layers=("mlp.gate_proj", "mlp.up_proj"), prev_op="pre_feedforward_layernorm",
               input="mlp.gate_proj", inspect="mlp", prev_offset=OFFSET),
        Subset(layers=("mlp.down_proj",), prev_op="mlp.up_proj", input="mlp.down_proj", inspect="mlp.down_proj"),
    ]
