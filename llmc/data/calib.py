"""Calibration data: load a source, preprocess it into token samples, and batch them."""
from __future__ import annotations

import os
import random

import torch
from loguru import logger

from llmc.data import preproc as _preproc  # registers the preprocessors
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
    for key in ("n_samples", "seq_len"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calib.{key}", f"got {value!r}; expected a positive integer")
    name = cfg.preproc or source.default_preproc
    fn = PREPROCESSORS.get(name, "calib.preproc")
    rows = custom_questions(cfg, tokenizer) if _custom_layout(cfg) else source(cfg.path, cfg.download, "calib", "calib")
    if _whole_rows(cfg):
        name = "one sample per question (padding: True)"
        samples = _preproc.whole_rows(rows, tokenizer, cfg.n_samples, cfg.seq_len)
    else:
        # A private generator: the samples do not depend on (or disturb) the global RNG state.
        samples = fn(rows, tokenizer, cfg.n_samples, cfg.seq_len, random.Random(cfg.seed))
    logger.info(f"calib: {len(samples)} samples from {cfg.name} via {name} (seq_len {cfg.seq_len})")
    return samples


def _custom_layout(cfg) -> bool:
    """LLMC's custom_txt: a folder holding samples.json (records with a 'question')."""
    return cfg.name.lower() == "custom_txt" and bool(cfg.path) and os.path.isfile(os.path.join(cfg.path, "samples.json"))


def _whole_rows(cfg) -> bool:
    """LLMC's padded custom data: without a preproc, each question is one sample of its own length."""
    return bool(getattr(cfg, "padding", False)) and _custom_layout(cfg) and not cfg.preproc


def _varying_lengths(cfg) -> bool:
    return _whole_rows(cfg) or (cfg.preproc or default_preproc(cfg.name)) == "ultrachat_general"


def check_calib(cfg) -> None:
    """LLMC's calibration modes, before any weight loads."""
    chat = cfg.name.lower() == "ultrachat"
    if chat and cfg.preproc and cfg.preproc != "ultrachat_general":
        raise ConfigError("calib.preproc", f"{cfg.preproc!r} with name: ultrachat; expected ultrachat_general "
                          "(each conversation through the chat template), as LLMC pairs them")
    if getattr(cfg, "apply_chat_template", False) and not (chat or _custom_layout(cfg)):
        raise ConfigError("calib.apply_chat_template", "True is read with name: ultrachat or with name: custom_txt "
                          "and a path holding samples.json (LLMC's custom data layout); "
                          f"here name is {cfg.name} and path {cfg.path}")
    if _varying_lengths(cfg) and not getattr(cfg, "padding", False) and cfg.bs != 1:
        raise ConfigError("calib.padding", f"False with bs: {cfg.bs}, but these samples (one per conversation or "
                          "question) differ in length; expected padding: True (as LLMC's chat configs) or bs: 1")


def custom_questions(cfg, tokenizer) -> list[str]:
    """The questions of path/samples.json, each wrapped in the chat template when apply_chat_template (the
    system turn and generation prompt LLMC adds); they go to the preprocessor as text rows."""
    from llmc.evaluation.generate import prompts, read_samples

    return prompts(read_samples(cfg.path, "calib"), tokenizer, getattr(cfg, "apply_chat_template", False), "calib")


def batch_samples(samples: list[torch.Tensor], bs: int, padding: bool = False) -> list[torch.Tensor]:
    """Stack [1, L] samples into [B, L] batches: bs == -1 → one batch, bs >= 1 → chunks of bs.

    padding: a chunk whose samples differ in length runs as one batch per length instead of a batch padded
    to its longest sample. Every block and algorithm then sees exactly the tokens a masked padded batch
    would feed it, and no pad token can enter a statistic (LLMC masks pads in AWQ's loss only)."""
    if isinstance(bs, bool) or not isinstance(bs, int) or (bs < 1 and bs != -1):
        raise ConfigError("calib.bs", f"got {bs!r}; expected -1 (one batch of all samples) or a positive integer")
    if not samples:
        return []
    size = len(samples) if bs == -1 else bs
    batches = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        lengths = sorted({s.shape[-1] for s in chunk})
        if len(lengths) > 1 and not padding:
            raise ConfigError(
                "calib.bs",
                f"bs={bs} puts samples of different lengths {lengths} in one batch; "
                "use bs: 1 or padding: True (this preprocessor yields samples of varying length)",
            )
        for length in lengths:
            batches.append(torch.cat([s.reshape(1, -1) for s in chunk if s.shape[-1] == length], dim=0))
    if padding and len(batches) > -(-len(samples) // size):
        logger.info(f"calib.padding: {len(samples)} samples of {len({s.shape[-1] for s in samples})} lengths run as "
                    f"{len(batches)} batches of equal-length samples (no pad tokens)")
    return batches
