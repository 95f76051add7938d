"""Calibration and evaluation data; importing this registers the sources and preprocessors."""
from llmc.data import preproc, sources  # noqa: F401
from llmc.data.calib import batch_samples, default_preproc, load_calib_samples
from llmc.data.eval_text import load_eval_text

__all__ = ["load_calib_samples", "batch_samples", "default_preproc", "load_eval_text"]
