"""Qwen3: the Llama layout with per-head RMSNorms (q_norm, k_norm) on q_proj's and k_proj's outputs.

Those norms undo any scale on q_proj's or k_proj's rows, so no subset may name either as its prev_op;
folds into their columns (from input_layernorm) leave q/k outputs unchanged and stay exact."""
from llmc.models.llama import Llama
from llmc.registry import ADAPTERS


@ADAPTERS.register("qwen3")
class Qwen3(Llama):
    pass
