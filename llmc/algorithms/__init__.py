"""Importing this package registers every algorithm."""
from llmc.algorithms import (adadim, awq, dgq, gptq, hqq, llmint8, normtweaking, omniquant, osplus,  # noqa: F401
                             pss, quarot, quik, rtn, signround, smoothquant, spinquant, spqr, teq,
                             tesseraq)
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
