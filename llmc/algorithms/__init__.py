"""Importing this package registers every algorithm."""
from llmc.algorithms import awq, gptq, hqq, normtweaking, omniquant, quarot, rtn, signround, smoothquant  # noqa: F401
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
