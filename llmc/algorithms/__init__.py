"""Importing this package registers every algorithm."""
from llmc.algorithms import (awq, gptq, hqq, normtweaking, omniquant, osplus, pss, quarot, rtn,  # noqa: F401
                             signround, smoothquant, tesseraq)
from llmc.algorithms.base import Algorithm, Options

__all__ = ["Algorithm", "Options"]
