"""DeepSeek-V2/V3: multi-head latent attention (MLA), the first `first_k_dense_replace` blocks dense, the
rest routed experts plus shared experts.

MLA: q_a_proj (or q_proj without a query LoRA) and kv_a_proj_with_mqa read input_layernorm's output;
q_b_proj reads q_a_layernorm's and kv_b_proj kv_a_layernorm's, which fold exactly. kv_a_proj's output is
split into the compressed kv (normed) and the rotary key part, and o_proj reads attention over kv_b_proj's
value rows interleaved per head with its key rows: neither is a plain per-channel map, so they take no fold. QuaRot rotates the residual stream through
q_a_proj/kv_a_proj's inputs (the latent norms stay inside attention), o_proj and every down linear.
"""

from llmc.models.llama import Llama
from llmc.models.moe import MoeAdapter
from llmc.models.adapter import Subset
from llmc.registry import ADAPTERS

ATTN = "self_attn"

def mla_subsets(q_lora: bool) -> list[Subset]:
    q_first = f"{ATTN}.q_a_proj" if q_lora else f"{ATTN}.q_proj"
    subsets = [Subset(layers=(q_first, f"{ATTN}.kv_a_proj_with_mqa"), prev_op="input_layernorm", input=q_first,
                      inspect=ATTN, has_kwargs=True)]
    if q_lora:
        subsets.append(Subset(layers=(f"{ATTN}.q_b_proj",), prev_op=f"{ATTN}.q_a_layernorm",
                              input=f"{ATTN}.q_b_proj", inspect=f"{ATTN}.q_b_proj"))
    subsets += [Subset(layers=(f"{ATTN}.kv_b_proj",), prev_op=f"{ATTN}.kv_a_layernorm", input=f"{ATTN}.kv_b_proj",
                       inspect=f"{ATTN}.kv_b_proj"),
                Subset(layers=(f"{ATTN}.o_proj",), prev_op=None, input=f"{ATTN}.o_proj", inspect=f"{ATTN}.o_proj")]
    return subsets

@ADAPTERS.register("deepseek_v3", "deepseek_v2")
class Deepseek(MoeAdapter):
    blocks = Llama.blocks
    embeddings = Llama.embeddings
    final = Llama.final
    attention_subsets = mla_subsets(True)
    dense_subsets = Llama.subsets[2:]
    norm_kind, embed_tokens, attn_out, mlp_out = Llama.norm_kind, Llama.embed_tokens, Llama.attn_out, Llama.mlp_out
    # no attn_value: MLA's values are rows of kv_b_proj interleaved with key rows (QuaRot rotates o_proj's input)
    shared = "mlp.shared_experts"
    # every projection whose output forms the attention scores (kv_b_proj's key rows among them)
    score_layers = tuple(f"{ATTN}.{n}" for n in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"))

    def __init__(self, model):
        self.attention_subsets = mla_subsets(getattr(model.config, "q_lora_rank", None) is not None)
        super().__init__(model)
