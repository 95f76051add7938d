"""OPT: pre-LayerNorm decoder with ReLU MLP (fc1 → fc2) and learned positions."""
from llmc.models.adapter import Adapter, Subset
from llmc.registry import ADAPTERS


@ADAPTERS.register("opt")
class Opt(Adapter):
    blocks = "model.decoder.layers"
    embeddings = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"]
    final = ["model.decoder.final_layer_norm", "model.decoder.project_out"]
    subsets = [
        Subset(layers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), prev_op="self_attn_layer_norm",
               input="self_attn.q_proj", inspect="self_attn", has_kwargs=True, shiftable=True),
        Subset(layers=("self_attn.out_proj",), prev_op="self_attn.v_proj", input="self_attn.out_proj",
               inspect="self_attn.out_proj", shiftable=True),
        Subset(layers=("fc1",), prev_op="final_layer_norm", input="fc1", inspect="fc1", shiftable=True),
        Subset(layers=("fc2",), prev_op="fc1", input="fc2", inspect="fc2"),
    ]
