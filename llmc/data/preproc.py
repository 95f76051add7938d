"""Calibration preprocessors: rows of text → token samples, following LLMC / GPTQ / AWQ.

Each is registered in ``PREPROCESSORS`` as
``fn(rows, tokenizer, n_samples, seq_len, rng) -> list[LongTensor [1, L]]``.
All randomness comes from ``rng`` (a ``random.Random``), never from global state.
Text is tokenized with ``tokenizer(text, return_tensors='pt')`` as LLMC does, so special tokens
(e.g. a BOS) are added the way the tokenizer adds them.
"""
from __future__ import annotations

import random

import torch
from loguru import logger

from llmc.errors import UserError
from llmc.registry import PREPROCESSORS

# c4_gptq draws rows until one is long enough; give up after this many misses for one sample.
MAX_DRAWS = 10_000


def encode(tokenizer, text: str, max_length: int | None = None) -> torch.Tensor:
    """Token ids [1, L] (int64). ``verbose=False`` silences the "longer than model_max_length" warning."""
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    ids = tokenizer(text, return_tensors="pt", verbose=False, **kwargs).input_ids
    return ids.long()


def _finish(samples: list[torch.Tensor], n_samples: int, name: str, what: str) -> list[torch.Tensor]:
    if not samples:
        raise UserError(f"calibration preprocessor '{name}' produced no samples: {what}")
    if len(samples) < n_samples:
        logger.warning(f"{name}: only {len(samples)} of {n_samples} calibration samples could be made ({what})")
    return samples


def _windows(ids: torch.Tensor, n_samples: int, seq_len: int, rng: random.Random, name: str) -> list[torch.Tensor]:
    """GPTQ's sampling: n_samples windows of seq_len at random starts in one long token stream."""
    total = ids.shape[1]
    if total < seq_len:
        raise UserError(f"{name}: the calibration text has {total} tokens, fewer than seq_len={seq_len}")
    out = []
    for _ in range(n_samples):
        # GPTQ draws from [0, N - seq_len - 1]; a stream of exactly seq_len tokens has only start 0.
        start = rng.randint(0, total - seq_len - 1) if total > seq_len else 0
        out.append(ids[:, start:start + seq_len])
    return out


def _shuffled(rows: list[str], rng: random.Random) -> list[str]:
    rows = list(rows)
    rng.shuffle(rows)
    return rows


@PREPROCESSORS.register("wikitext2_gptq")
def wikitext2_gptq(rows, tokenizer, n_samples, seq_len, rng):
    """Windows from the rows joined with blank lines (the GPTQ wikitext2 loader)."""
    return _windows(encode(tokenizer, "\n\n".join(rows)), n_samples, seq_len, rng, "wikitext2_gptq")


@PREPROCESSORS.register("ptb_gptq")
def ptb_gptq(rows, tokenizer, n_samples, seq_len, rng):
    """Windows from the sentences joined with spaces (the GPTQ ptb loader)."""
    return _windows(encode(tokenizer, " ".join(rows)), n_samples, seq_len, rng, "ptb_gptq")


@PREPROCESSORS.register("c4_gptq")
def c4_gptq(rows, tokenizer, n_samples, seq_len, rng):
    """Per sample: a random document with >= seq_len tokens, then a random window in it."""
    if not rows:
        raise UserError("c4_gptq: the calibration data has no rows")
    cache: dict[int, torch.Tensor] = {}
    short: set[int] = set()
    samples = []
    for _ in range(n_samples):
        for _draw in range(MAX_DRAWS):
            i = rng.randint(0, len(rows) - 1)
            if i not in cache:
                cache[i] = encode(tokenizer, rows[i])
            if cache[i].shape[1] >= seq_len:
                break
            short.add(i)
            if len(short) == len(rows):
                raise UserError(f"c4_gptq: no row of the calibration data has at least seq_len={seq_len} tokens")
        else:
            break
        samples.extend(_windows(cache[i], 1, seq_len, rng, "c4_gptq"))
    return _finish(samples, n_samples, "c4_gptq", f"rows of >= {seq_len} tokens are too rare")


@PREPROCESSORS.register("pileval_awq")
def pileval_awq(rows, tokenizer, n_samples, seq_len, rng):
    """AWQ: n_samples shuffled non-empty lines of <= seq_len tokens, concatenated, cut into seq_len pieces.

    ``n_samples`` counts lines here, so the number of samples is floor(total tokens / seq_len).
    """
    lines = []
    for row in _shuffled(rows, rng):
        ids = encode(tokenizer, row.strip())
        if ids.shape[1] == 0 or ids.shape[1] > seq_len:
            continue
        lines.append(ids)
        if len(lines) == n_samples:
            break
    if len(lines) < n_samples:
        logger.warning(f"pileval_awq: only {len(lines)} of {n_samples} lines have 1..{seq_len} tokens")
    stream = torch.cat(lines, dim=1) if lines else torch.zeros(1, 0, dtype=torch.long)
    n_split = stream.shape[1] // seq_len
    if n_split == 0:
        raise UserError(
            f"pileval_awq: {len(lines)} lines give {stream.shape[1]} tokens, fewer than seq_len={seq_len}"
        )
    logger.info(f"pileval_awq: {len(lines)} lines → {n_split} samples of {seq_len} tokens")
    return [stream[:, k * seq_len:(k + 1) * seq_len] for k in range(n_split)]


@PREPROCESSORS.register("pileval_smooth")
def pileval_smooth(rows, tokenizer, n_samples, seq_len, rng):
    """SmoothQuant: the first n_samples shuffled rows, each truncated to seq_len (lengths may differ)."""
    samples = [encode(tokenizer, row, seq_len) for row in _shuffled(rows, rng)[:n_samples]]
    return _finish(samples, n_samples, "pileval_smooth", "too few rows")


@PREPROCESSORS.register("pileval_omni")
def pileval_omni(rows, tokenizer, n_samples, seq_len, rng):
    """OmniQuant: windows from the first 1000 rows joined with blank lines."""
    return _windows(encode(tokenizer, "\n\n".join(rows[:1000])), n_samples, seq_len, rng, "pileval_omni")


@PREPROCESSORS.register("txt_general_preproc")
def txt_general_preproc(rows, tokenizer, n_samples, seq_len, rng):
    """Shuffled rows truncated to seq_len; only rows reaching exactly seq_len tokens are kept."""
    samples = []
    for row in _shuffled(rows, rng):
        ids = encode(tokenizer, row, seq_len)
        if ids.shape[1] == seq_len:
            samples.append(ids)
            if len(samples) == n_samples:
                break
    return _finish(samples, n_samples, "txt_general_preproc", f"too few rows have >= {seq_len} tokens")


@PREPROCESSORS.register("random_truncate_txt")
def random_truncate_txt(rows, tokenizer, n_samples, seq_len, rng):
    """Shuffled rows joined with blank lines, then random windows."""
    return _windows(encode(tokenizer, "\n\n".join(_shuffled(rows, rng))), n_samples, seq_len, rng,
                    "random_truncate_txt")


def _conversation_text(row, tokenizer) -> str:
    """A chat row through the tokenizer's chat template (tokenize=False, as LLMC's ultrachat_general); text as is."""
    if isinstance(row, str):
        return row
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("calib: the conversations need the tokenizer's chat template, and this model's tokenizer "
                        "has none (preproc ultrachat_general)")
    return tokenizer.apply_chat_template(row, tokenize=False)


@PREPROCESSORS.register("ultrachat_general")
def ultrachat_general(rows, tokenizer, n_samples, seq_len, rng):
    """LLMC's chat calibration: n_samples shuffled conversations, each through the chat template and
    tokenized whole (the template brings its own special tokens), cut at seq_len. One sample per
    conversation, so lengths differ: calibrate with padding: True or bs: 1."""
    samples = []
    for row in _shuffled(rows, rng)[:n_samples]:
        ids = tokenizer(_conversation_text(row, tokenizer), return_tensors="pt", add_special_tokens=False,
                        truncation=True, max_length=seq_len, verbose=False).input_ids.long()
        if ids.shape[1]:
            samples.append(ids)
    return _finish(samples, n_samples, "ultrachat_general", "too few non-empty conversations")


def whole_rows(rows, tokenizer, n_samples, seq_len) -> list[torch.Tensor]:
    """LLMC's padded custom data: the first n_samples rows in file order, each one sample (cut at seq_len)."""
    samples = [encode(tokenizer, row, seq_len) for row in rows[:n_samples]]
    return _finish([s for s in samples if s.shape[1]], n_samples, "calib.padding", "too few non-empty rows")
