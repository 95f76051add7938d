"""Importing this module registers every model family."""
from llmc.models import llama, opt, qwen2  # noqa: F401
