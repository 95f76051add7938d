"""The evaluation types beside ppl and lm_eval, as one section of the config sees them: checks before any
weight loads, data prepared before the weights load, and one result row per (position, dataset)."""
from __future__ import annotations

import os

from loguru import logger

from llmc.errors import ConfigError
from llmc.evaluation import decode_ppl, generate, token_acc
from llmc.evaluation.ppl import eval_windows
from llmc.registry import DATASETS

# Keys that only one evaluation type reads: elsewhere they would change nothing.
ONLY = {"num_eval_tokens": ("decode_ppl",), "max_new_tokens": ("generate_only",),
        "apply_chat_template": ("generate_only",)}
GENERATE_NAME = "custom_gen"


def check_section(ev, prefix: str) -> None:
    """Config errors of a ppl / decode_ppl / token_acc / generate_only section."""
    for key, types in ONLY.items():
        if getattr(ev, key) not in (None, False) and ev.type not in types:
            raise ConfigError(f"{prefix}.{key}", f"{getattr(ev, key)!r} is read only by type {'/'.join(types)} "
                              f"(this section is type {ev.type}); remove it or change the type")
    if ev.tasks:
        raise ConfigError(f"{prefix}.tasks", f"{ev.tasks} names lm-eval tasks; add type: lm_eval to this section")
    if not ev.eval_pos:
        logger.info(f"{prefix}: eval_pos is empty, so this section evaluates nothing (its data is not read)")
        return
    if ev.type == "generate_only":
        if ev.name != [GENERATE_NAME]:
            raise ConfigError(f"{prefix}.name", f"{ev.name} with type generate_only; generation reads prompts "
                              f"from LLMC's custom data layout: name: {GENERATE_NAME}, path: a folder with samples.json")
        if ev.download:
            raise ConfigError(f"{prefix}.download", "True with type generate_only: the prompts are local")
        generate.samples_file(ev.path, prefix)
        return
    for name in ev.name:
        DATASETS.get(name, f"{prefix}.name")
        path = ev.path_for(name)
        if ev.download:
            continue
        if not path:
            raise ConfigError(f"{prefix}.path", "is required when download is False (a local file or saved "
                              "dataset folder; with several names, a folder holding one entry per name)")
        if not os.path.exists(path):
            raise ConfigError(f"{prefix}.path", f"'{path}' does not exist" + (
                f" (with several names, {name} is read from path/{name})" if len(ev.name) > 1 else ""))
    if ev.type == "decode_ppl":
        decode_ppl.check_section(ev, prefix)


def prepare(ev, name: str, tokenizer, prefix: str):
    """The section's data for one dataset, before any weight loads: token windows (ppl, token_acc),
    token rows (decode_ppl) or prompts (generate_only)."""
    from llmc.data import load_eval_text
    from llmc.data.eval_text import load_eval_rows

    if ev.type == "generate_only":
        return generate.prompts(generate.read_samples(ev.path, prefix), tokenizer, ev.apply_chat_template, prefix)
    path = ev.path_for(name)
    if ev.type == "decode_ppl":
        texts = decode_ppl.decode_texts(load_eval_rows(name, path, ev.download, prefix), tokenizer, ev.num_samples)
        if not any(t.shape[1] > 1 for t in texts):
            raise ConfigError(f"{prefix}.num_samples", f"{ev.num_samples}: the first rows of {name} have no "
                              "token to predict; raise num_samples")
        return texts
    text = load_eval_text(name, path, ev.download, prefix)
    try:
        return eval_windows(tokenizer, text, ev.seq_len, ev.num_samples)
    except ValueError as err:
        raise ConfigError(f"{prefix}.seq_len", f"{ev.seq_len}: {name} ({path or 'downloaded'}): {err}; "
                          "choose a shorter seq_len or a longer text") from None


def float_references(config, model, adapter, data: dict, ctx) -> dict:
    """token_acc's reference: the float model's predictions on each token_acc section's windows, taken
    before anything is quantized."""
    refs = {}
    for (i, name), windows in data.items():
        ev = config.eval[i]
        if ev.type == "token_acc":
            per_block = ev.inference_per_block or ctx.store is not None
            with ctx.dtype(ev.compute_dtype):
                refs[(i, name)] = token_acc.predictions(model, adapter, windows, ev.bs, ctx, per_block, "float reference")
    return refs


def evaluate(model, adapter, tokenizer, ev, name: str, data, reference, ctx, pos: str) -> dict:
    """One result row of a decode_ppl / token_acc / generate_only section at `pos`."""
    row = {"pos": pos, "type": ev.type, "dataset": name}
    if ev.type == "decode_ppl":
        value, tokens = decode_ppl.decode_perplexity(model, data, ctx, ev.num_eval_tokens)
        row.update(value=value, tokens=tokens)
        logger.info(f"{pos} {name}: decode PPL {value:.4f} ({tokens} tokens)")
    elif ev.type == "token_acc":
        per_block = ev.inference_per_block or ctx.store is not None
        preds = token_acc.predictions(model, adapter, data, ev.bs, ctx, per_block, f"{pos} token_acc")
        row.update(value=token_acc.token_accuracy(preds, reference), windows=data.shape[0], seq_len=ev.seq_len)
        logger.info(f"{pos} {name}: token agreement with the float model {row['value']:.4f}")
    else:
        texts = generate.generate(model, tokenizer, data, ev.bs, ev.max_new_tokens or 32, ctx)
        row["samples"] = [{"prompt": p, "response": r} for p, r in zip(data, texts)]
        logger.info(f"{pos} {name}: generated {len(texts)} texts (results.json)")
    return row
