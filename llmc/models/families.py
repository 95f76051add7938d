"""Importing this module registers every model family."""
from llmc.models import deepseek, gemma, llama, mixtral, opt, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe  # noqa: F401
