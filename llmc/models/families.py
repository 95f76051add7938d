"""Importing this module registers every model family."""
from llmc.models import deepseek, llama, mixtral, opt, qwen2, qwen2_moe, qwen3_moe  # noqa: F401
