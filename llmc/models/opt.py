"""OPT: decoder with ReLU MLP (fc1 → fc2) and learned positions; pre-LayerNorm except OPT-350m's layout."""
from dataclasses import replace

from llmc.models.adapter import Adapter, Subset
from llmc.registry import ADAPTERS


@ADAPTERS.register("opt")
class Opt(Adapter):
    blocks = "model.decoder.layers"
    embeddings = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"]
    final = ["model.decoder.final_layer_norm", "model.decoder.project_out"]
    norm_kind = "layer"
    subsets = [
        Subset(layers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), prev_op="self_attn_layer_norm",
               input="self_attn.q_proj", inspect="self_attn", has_kwargs=True, shiftable=True),
        Subset(layers=("self_attn.out_proj",), prev_op="self_attn.v_proj", input="self_attn.out_proj",
               inspect="self_attn.out_proj", shiftable=True),
        Subset(layers=("fc1",), prev_op="final_layer_norm", input="fc1", inspect="fc1", shiftable=True),
        Subset(layers=("fc2",), prev_op="fc1", input="fc2", inspect="fc2"),
    ]

    def __init__(self, model):
        super().__init__(model)
        if not getattr(model.config, "do_layer_norm_before", True):
            # Post-LayerNorm (OPT-350m): q/k/v read the block input and fc1 reads the residual stream after
            # self_attn_layer_norm, which the residual also carries: no op in front of them can absorb a
            # scale without changing the residual, so these subsets take no fold.
            norms = ("self_attn_layer_norm", "final_layer_norm")
            self.subsets = [replace(s, prev_op=None, shiftable=False) if s.prev_op in norms else s
                            for s in type(self).subsets]
