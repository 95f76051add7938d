"""Importing this package registers every algorithm."""
from llmc.algorithms import (awq, gptq, hqq, llmint8, normtweaking, omniquant, osplus, pss, quarot,  # noqa: F401
                             quik, rtn, signround, smoothquant, tesseraq)
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
