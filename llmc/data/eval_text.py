"""Evaluation text: one string per dataset, joined the way GPTQ-style perplexity evaluation does.

Tokenizing and windowing the string happen in the evaluation code.
"""
from __future__ import annotations

from llmc.data import sources
from llmc.registry import DATASETS

# GPTQ's c4 perplexity uses only the first 1100 validation documents.
C4_EVAL_DOCS = 1100


def load_eval_text(name: str, path: str | None, download: bool, key: str = "eval") -> str:
    """wikitext2: test rows joined by "\\n\\n"; ptb: test sentences joined by " "; c4: the first 1100
    validation docs joined by " "; txt: the file's text as is (a folder: its .txt files joined by
    "\\n\\n"); other sources: rows joined by "\\n\\n". ``key`` is the config section for errors."""
    source = DATASETS.get(name, f"{key}.name")
    if source is sources.txt:
        found = sources.need_path(path, key, "a local text file or a folder of .txt files")
        return "\n\n".join(sources.read_text(f, key) for f in sources.txt_files(found, key))
    rows = source(path, download, "eval", key)
    if source is sources.c4:
        return " ".join(rows[:C4_EVAL_DOCS])
    if source is sources.ptb:
        return " ".join(rows)
    return "\n\n".join(rows)


def load_eval_rows(name: str, path: str | None, download: bool, key: str = "eval") -> list[str]:
    """The dataset's rows unjoined (wikitext2: its lines), as decode_ppl reads them."""
    return DATASETS.get(name, f"{key}.name")(path, download, "eval", key)
