"""Importing this module registers every model family."""
from llmc.models import gemma, llama, opt, phi3, qwen2, qwen3  # noqa: F401
