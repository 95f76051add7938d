"""Qwen2: the Llama layout with biases on q/k/v."""
from llmc.models.llama import Llama
from llmc.registry import ADAPTERS


@ADAPTERS.register("qwen2")
class Qwen2(Llama):
    pass
