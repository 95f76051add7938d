"""Qwen2-MoE (Qwen1.5-MoE): routed experts plus one shared expert scaled by a sigmoid gate."""
from llmc.models.qwen3_moe import Qwen3Moe
from llmc.registry import ADAPTERS


@ADAPTERS.register("qwen2_moe")
class Qwen2Moe(Qwen3Moe):
    shared = "mlp.shared_expert"
    shared_gate = "mlp.shared_expert_gate"
