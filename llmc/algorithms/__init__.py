"""Importing this package registers every algorithm."""
from llmc.algorithms import (adadim, awq, gptq, hqq, normtweaking, omniquant, quarot, rtn, signround,  # noqa: F401
                             smoothquant, spqr, tesseraq)
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
