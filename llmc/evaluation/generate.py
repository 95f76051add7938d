"""`eval.type: generate_only` (LLMC's CustomGenerate): greedy generation of `max_new_tokens` (32) from
the `question` of every record in `path/samples.json` (LLMC's custom data layout), optionally wrapped in
the tokenizer's chat template as LLMC wraps it (a system turn "You are a helpful assistant." and the user
turn, with the generation prompt). The texts land in results.json with the eval row."""
from __future__ import annotations

import copy
import json
import os

import torch

from llmc.errors import ConfigError

SYSTEM = "You are a helpful assistant."


def samples_file(path, key: str) -> str:
    if not path:
        raise ConfigError(f"{key}.path", "is required: a folder holding samples.json (LLMC's custom data layout)")
    file = os.path.join(path, "samples.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"{key}.path", f"'{path}' holds no samples.json (a JSON list of records with a "
                          "'question' field, LLMC's custom data layout)")
    return file


def read_samples(path, key: str) -> list[dict]:
    file = samples_file(path, key)
    try:
        records = json.loads(open(file, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}.path", f"cannot read '{file}' as a JSON list: {exc}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{key}.path", f"'{file}' must hold a non-empty JSON list of records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("question", ""), str):
            raise ConfigError(f"{key}.path", f"'{file}' record {i} is not an object with a string 'question'")
    return records


def chat_prompt(tokenizer, question: str, key: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{key}.apply_chat_template", "True, but the model's tokenizer has no chat template")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompts(records: list[dict], tokenizer, chat: bool, key: str = "eval") -> list[str]:
    return [chat_prompt(tokenizer, r.get("question", ""), key) if chat else r.get("question", "") for r in records]


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], bs: int, max_new_tokens: int, ctx) -> list[str]:
    """Greedy continuations (prompt excluded) of every text, bs prompts per call, padded on the left."""
    tok = copy.copy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(ctx.device)
    out = []
    try:
        for s in range(0, len(texts), bs):
            enc = tok(texts[s:s + bs], return_tensors="pt", padding=True).to(ctx.device)
            with ctx.autocast():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.to(ctx.offload_device)
    return out
