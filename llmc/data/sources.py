"""Text sources: each turns (path, download, split) into a list of text rows.

Every source is registered in ``DATASETS`` as ``rows(path, download, split, key=None) -> list[str]``;
``split`` is "calib" or "eval" and ``key`` is the config section named in errors (defaults to ``split``).
Each source carries ``default_preproc``, the preprocessor LLMC pairs with it.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Iterable

from llmc.errors import ConfigError, UserError
from llmc.registry import DATASETS

SPLITS = ("calib", "eval")


def _source(*names: str, preproc: str):
    def decorate(fn: Callable) -> Callable:
        fn.default_preproc = preproc
        return DATASETS.register(*names)(fn)

    return decorate


def _section(split: str, key: str | None) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return key or split


def need_path(path: str | None, section: str, what: str) -> str:
    """The expanded ``path``; ConfigError on ``{section}.path`` if it is unset or missing."""
    if not path:
        raise ConfigError(f"{section}.path", f"is not set; expected {what}")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ConfigError(f"{section}.path", f"'{path}' does not exist; expected {what}")
    return path


def _download(section: str, desc: str, *args, **kwargs) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub and cache failures come in many types
        raise UserError(
            f"{section}: could not download {desc} ({type(exc).__name__}: {exc}). "
            f"Set {section}.download: false and {section}.path to a local copy."
        ) from exc


def _column(ds: Any, column: str, section: str, value: str) -> list[str]:
    names = list(getattr(ds, "column_names", None) or [])
    if column not in names:
        raise ConfigError(f"{section}.path", f"dataset at '{value}' has no column '{column}' (columns: {names})")
    return [str(x) for x in ds[column]]


def _load_saved(path: str, prefer: list[str], section: str) -> Any:
    """The Dataset in a folder written by ``datasets.save_to_disk``; of a DatasetDict, the first split in
    ``prefer`` (or its only one)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:
        raise ConfigError(
            f"{section}.path", f"'{path}' is a folder but not a saved dataset (datasets.save_to_disk): {exc}"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        chosen = next((s for s in prefer if s in ds), None)
        if chosen is None and len(ds) == 1:
            chosen = next(iter(ds))
        if chosen is None:
            raise ConfigError(
                f"{section}.path", f"saved dataset '{path}' has splits {list(ds)}; expected one of {prefer}"
            )
        ds = ds[chosen]
    return ds


def _from_disk(path: str, column: str, split: str, section: str) -> list[str]:
    """Rows from a folder written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict)."""
    prefer = ["train"] if split == "calib" else ["test", "validation"]
    return _column(_load_saved(path, prefer, section), column, section, path)


def read_text(path: str, section: str) -> str:
    """A UTF-8 file's text (``.gz`` decompressed), with universal newlines as HF's builders read it."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{section}.path", f"cannot read '{path}' as UTF-8 text: {exc}") from exc


def wikitext_rows(text: str) -> list[str]:
    """Rows of a local wikitext file as `datasets.load_dataset("text", data_files=path)` yields them: one per
    line, line endings (LF or CRLF) dropped. Joined by "\\n\\n" this is the text the published SmolLM2
    baselines here were measured on (FP 20.81 on the first 40 x 2048 windows of wiki.test.raw)."""
    return text.splitlines()


def _record_text(rec: Any, pairs: bool, where: str, section: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if isinstance(rec.get("text"), str):
            return rec["text"]
        # PaddleSlim-style pairs: prompt then answer on the next line, as one causal-LM text.
        if pairs and isinstance(rec.get("src"), str):
            tgt = rec.get("tgt")
            return rec["src"] + ("\n" + tgt if isinstance(tgt, str) and tgt else "")
    expected = "a string field 'text' or 'src' (+ optional 'tgt')" if pairs else "a string field 'text'"
    raise ConfigError(f"{section}.path", f"{where}: record {str(rec)[:80]!r} lacks {expected}")


def _json_records(path: str, section: str) -> Iterable[tuple[str, Any]]:
    text = read_text(path, section)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{section}.path", f"'{path}' is not valid JSON: {exc}") from exc
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    if stripped.startswith("{"):
        # One JSON object spanning the file, or JSON lines (c4's .json.gz shards are JSON lines).
        try:
            return [(path, json.loads(text))]
        except json.JSONDecodeError:
            pass
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{section}.path", f"'{path}' line {n} is not valid JSON: {exc}") from exc
    return out


def _records(path: str | None, split: str, section: str, pairs: bool = False, hint: str = "") -> list[str]:
    """Rows from a .json/.jsonl file (optionally .gz) or a saved dataset folder."""
    path = need_path(path, section, "a .json/.jsonl file or a datasets.save_to_disk folder" + hint)
    if os.path.isdir(path):
        return _from_disk(path, "text", split, section)
    return [_record_text(rec, pairs, where, section) for where, rec in _json_records(path, section)]


def txt_files(path: str, section: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
    if not files:
        raise ConfigError(f"{section}.path", f"folder '{path}' holds no .txt files")
    return files


@_source("wikitext2", "wikitext", preproc="wikitext2_gptq")
def wikitext2(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """WikiText-2 raw: train split for calib, test split for eval."""
    section = _section(split, key)
    if download:
        hf_split = "train" if split == "calib" else "test"
        ds = _download(section, "wikitext-2-raw-v1", "wikitext", "wikitext-2-raw-v1", split=hf_split)
        return _column(ds, "text", section, "wikitext")
    what = "a wikitext file (e.g. wiki.test.raw) or a datasets.save_to_disk folder, or download: true"
    path = need_path(path, section, what)
    raw = os.path.join(path, "wiki.train.raw" if split == "calib" else "wiki.test.raw")
    if os.path.isdir(path) and os.path.isfile(raw):  # the raw release's folder
        return wikitext_rows(read_text(raw, section))
    if os.path.isdir(path):
        return _from_disk(path, "text", split, section)
    return wikitext_rows(read_text(path, section))


@_source("c4", preproc="c4_gptq")
def c4(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """C4 English: first train shard for calib, first validation shard for eval."""
    section = _section(split, key)
    if download:
        if split == "calib":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        hf_split = next(iter(files))
        ds = _download(section, "allenai/c4", "allenai/c4", data_files=files, split=hf_split)
        return _column(ds, "text", section, "allenai/c4")
    return _records(path, split, section, hint=", or download: true")


@_source("pileval", preproc="pileval_awq")
def pileval(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """The Pile validation set as AWQ uses it (mit-han-lab/pile-val-backup)."""
    section = _section(split, key)
    if download:
        ds = _download(section, "mit-han-lab/pile-val-backup", "mit-han-lab/pile-val-backup", split="validation")
        return _column(ds, "text", section, "mit-han-lab/pile-val-backup")
    return _records(path, split, section, hint=", or download: true")


@_source("ptb", preproc="ptb_gptq")
def ptb(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """Penn Treebank sentences; a local file has one sentence per line (stripped, blank lines dropped)."""
    section = _section(split, key)
    if download:
        hf_split = "train" if split == "calib" else "test"
        ds = _download(section, "ptb_text_only", "ptb_text_only", "penn_treebank", split=hf_split)
        return _column(ds, "sentence", section, "ptb_text_only")
    what = "a text file with one sentence per line or a datasets.save_to_disk folder, or download: true"
    path = need_path(path, section, what)
    if os.path.isdir(path):
        return _from_disk(path, "sentence", split, section)
    return [line.strip() for line in read_text(path, section).splitlines() if line.strip()]


@_source("txt", "custom_txt", preproc="txt_general_preproc")
def txt(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """Local text file or folder of .txt files; rows are the stripped non-empty lines."""
    section = _section(split, key)
    path = need_path(path, section, "a local .txt file or a folder of .txt files")
    rows = []
    for file in txt_files(path, section):
        rows += [line.strip() for line in read_text(file, section).splitlines() if line.strip()]
    return rows


@_source("jsonl", "json", preproc="txt_general_preproc")
def json_rows(path: str | None, download: bool, split: str, key: str | None = None) -> list[str]:
    """Local JSON lines / JSON list; a record is {"text": ...} or {"src": ..., "tgt": ...} (row = src + "\\n" + tgt)."""
    section = _section(split, key)
    return _records(path, split, section, pairs=True)


def _conversation(rec: Any, where: str, section: str) -> list[dict]:
    messages = rec.get("messages") if isinstance(rec, dict) else None
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise ConfigError(f"{section}.path", f"{where}: record {str(rec)[:80]!r} needs 'messages': a non-empty "
                          "list of {'role': str, 'content': str} (ultrachat_200k's layout)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@_source("ultrachat", preproc="ultrachat_general")
def ultrachat(path: str | None, download: bool, split: str, key: str | None = None) -> list[list[dict]]:
    """UltraChat 200k conversations (HuggingFaceH4/ultrachat_200k, train_sft), for chat calibration: each row
    is a list of messages. Local copies: a datasets.save_to_disk folder (as LLMC reads it) or .json/.jsonl
    records with a 'messages' list."""
    section = _section(split, key)
    if split != "calib":
        raise ConfigError(f"{section}.name", "ultrachat is chat calibration data (conversations, no test split); "
                          "expected wikitext2, c4, ptb or a text source for evaluation")
    if download:
        ds = _download(section, "HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrachat_200k", split="train_sft")
        return [_conversation(r, f"ultrachat_200k[{i}]", section) for i, r in enumerate(ds)]
    path = need_path(path, section, "a datasets.save_to_disk folder of ultrachat_200k or a .json/.jsonl file of "
                     "records with 'messages', or download: true")
    if not os.path.isdir(path):
        return [_conversation(rec, where, section) for where, rec in _json_records(path, section)]
    ds = _load_saved(path, ["train_sft", "train"], section)
    return [_conversation(r, f"{path}[{i}]", section) for i, r in enumerate(ds)]
