"""Importing this package registers every algorithm."""
from llmc.algorithms import (awq, dgq, gptq, hqq, llmint8, normtweaking, omniquant, osplus, pss,  # noqa: F401
                             quarot, quik, rtn, signround, smoothquant, teq, tesseraq)
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
