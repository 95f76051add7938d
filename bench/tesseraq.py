"""TesseraQ on SmolLM2-135M from AWQ's state (issue 26), on the P40 protocol of bench/omniquant.py: asymmetric
g64 weight-only at 3 and 2 bits, AWQ's scales and clips handed to TesseraQ in one process
(configs/quantization/combination/awq_comb_tesseraq/), calibration 128 x 512 tokens of wiki.valid.tokens, block
forwards under bfloat16 autocast, PPL on the first 40 x 2048 windows of wiki.test.raw in float32. Each row states
the average bits per weight of the decoder linears (codes, float16 scales, zero points at the code width).

    python bench/tesseraq.py [--redo] [--only LABEL ...]   # writes bench/results/tesseraq_smollm2.{json,md}
    python bench/tesseraq.py --dry-run                       # validates every row (llmc --dry-run) and prints bits

The .md ends with the rows of the methods it competes with, read from their own results files (bench/omniquant.py,
bench/weight_only.py); 'pending' where those were not measured.
"""
from __future__ import annotations

import os
import subprocess
import sys

from common import DATA, RESULTS, ROOT, load_rows, markdown, render, table_main
from weight_methods import bits_per_weight

NAME = "tesseraq_smollm2"
TITLE = ("SmolLM2-135M-Instruct, AWQ -> TesseraQ weight-only asym g64, calib 128 x 512 wiki.valid.tokens, bfloat16 "
         "autocast block forwards (rounding variables, scale factors and losses float32), PPL on wiki.test.raw first "
         "40 x 2048 in float32, CPU, llmc `bench/tesseraq.py`")
COMB = "configs/quantization/combination/awq_comb_tesseraq/w{}a16g64.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32",
        "model.compute_dtype=bfloat16"]
# label: (config, overrides, code bits)
ROWS = {f"AWQ -> TesseraQ W{bit} g64 (10 thresholds x 250 steps)": (COMB.format(bit), [], bit) for bit in (3, 2)}
# what the rows compete with, from other benches' results: (results file, label)
REFERENCES = {3: [("omniquant_smollm2", "AWQ -> OmniQuant W3 g64, 5 epochs"),
                  ("omniquant_smollm2", "OmniQuant W3 g64, 20 epochs"),
                  ("weight_only_smollm2", "GPTQ W3"), ("weight_only_smollm2", "AWQ W3")],
              2: [("omniquant_smollm2", "AWQ -> OmniQuant W2 g64, 5 epochs"),
                  ("omniquant_smollm2", "OmniQuant W2 g64, 20 epochs"),
                  ("weight_only_smollm2", "GPTQ W2"), ("weight_only_smollm2", "AWQ W2")]}


def bits(label: str) -> float:
    return bits_per_weight((ROWS[label][2], False, None))


def comparison(rows: dict) -> str:
    body = []
    for label, (_, _, bit) in ROWS.items():
        ours = rows.get(label, {}).get("ppl")
        body.append([label, f"{bits(label):.3f}", "pending" if ours is None else f"{ours:.3f}"])
        for name, ref in REFERENCES[bit]:
            v = load_rows(name).get(ref, {}).get("ppl")
            body.append([f"  {ref} ({name})", f"{bits(label):.3f}", "pending" if v is None else f"{v:.3f}"])
    return "Beside the methods it competes with (same protocol)\n\n" + markdown(["run", "bits/weight", "PPL"], body)


def dry_run() -> int:
    """Every row's config and overrides through `llmc --dry-run` (config checks, no weights loaded)."""
    failed = 0
    for label, (config, overrides, _) in ROWS.items():
        cmd = [sys.executable, "-m", "llmc", "--config", config, "--dry-run"]
        for o in EVAL + overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "LLMC_DATA": DATA})
        ok = proc.returncode == 0
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {bits(label):.3f} bits/weight"
              + ("" if ok else f"\n{proc.stderr[-1500:]}"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:
        raise SystemExit(dry_run())
    rows = table_main(NAME, TITLE, {k: (c, o) for k, (c, o, _) in ROWS.items()}, EVAL)
    table = comparison(rows)
    print("\n" + table)
    (RESULTS / f"{NAME}.md").write_text(f"{render(rows, TITLE)}\n\n{table}\n")
