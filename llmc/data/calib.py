"""Calibration data: load a source, preprocess it into token samples, and batch them."""
from __future__ import annotations

import os
import random

import torch
from loguru import logger

from llmc.data import preproc as _preproc  # noqa: F401  (registers the preprocessors)
from llmc.errors import ConfigError
from llmc.registry import DATASETS, PREPROCESSORS


def default_preproc(name: str) -> str:
    """The preprocessor LLMC pairs with dataset ``name`` (e.g. wikitext2 → wikitext2_gptq)."""
    return DATASETS.get(name, "calib.name").default_preproc


def load_calib_samples(cfg, tokenizer) -> list[torch.Tensor]:
    """Token samples [1, L] for calibration, reproducible from ``cfg.seed``.

    ``cfg`` needs ``name, download, path, n_samples, seq_len, preproc, seed``; ``preproc`` None
    picks the dataset's default.
    """
    source = DATASETS.get(cfg.name, "calib.name")
    name = cfg.preproc or source.default_preproc
    fn = PREPROCESSORS.get(name, "calib.preproc")
    for key in ("n_samples", "seq_len"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calib.{key}", f"got {value!r}; expected a positive integer")
    rows = custom_questions(cfg, tokenizer) if _custom_layout(cfg) else source(cfg.path, cfg.download, "calib", "calib")
    # A private generator: the samples do not depend on (or disturb) the global RNG state.
    samples = fn(rows, tokenizer, cfg.n_samples, cfg.seq_len, random.Random(cfg.seed))
    logger.info(f"calib: {len(samples)} samples from {cfg.name} via {name} (seq_len {cfg.seq_len})")
    return samples


def _custom_layout(cfg) -> bool:
    """LLMC's custom_txt: a folder holding samples.json (records with a 'question')."""
    return cfg.name.lower() == "custom_txt" and bool(cfg.path) and os.path.isfile(os.path.join(cfg.path, "samples.json"))


def check_calib(cfg) -> None:
    """LLMC's calibration modes, before any weight loads."""
    if getattr(cfg, "padding", False):
        raise ConfigError("calib.padding", "True: padded calibration batches (attention masks through every "
                          "block and algorithm) are not implemented yet; set padding: False (with custom_txt, "
                          "preproc random_truncate_txt cuts equal-length samples from the texts)")
    if getattr(cfg, "apply_chat_template", False) and not _custom_layout(cfg):
        raise ConfigError("calib.apply_chat_template", "True is read with name: custom_txt and a path holding "
                          "samples.json (LLMC's custom data layout); "
                          f"here name is {cfg.name} and path {cfg.path}")


def custom_questions(cfg, tokenizer) -> list[str]:
    """The questions of path/samples.json, each wrapped in the chat template when apply_chat_template (the
    system turn and generation prompt LLMC adds); they go to the preprocessor as text rows."""
    from llmc.evaluation.generate import prompts, read_samples

    return prompts(read_samples(cfg.path, "calib"), tokenizer, getattr(cfg, "apply_chat_template", False), "calib")


def batch_samples(samples: list[torch.Tensor], bs: int) -> list[torch.Tensor]:
    """Stack [1, L] samples into [B, L] batches: bs == -1 → one batch, bs >= 1 → chunks of bs."""
    if isinstance(bs, bool) or not isinstance(bs, int) or (bs < 1 and bs != -1):
        raise ConfigError("calib.bs", f"got {bs!r}; expected -1 (one batch of all samples) or a positive integer")
    if not samples:
        return []
    size = len(samples) if bs == -1 else bs
    batches = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        lengths = sorted({s.shape[-1] for s in chunk})
        if len(lengths) > 1:
            raise ConfigError(
                "calib.bs",
                f"bs={bs} puts samples of different lengths {lengths} in one batch; "
                "use bs: 1 (this preprocessor yields samples of varying length)",
            )
        batches.append(torch.cat([s.reshape(1, -1) for s in chunk], dim=0))
    return batches
