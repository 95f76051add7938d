"""Weight-only 4-bit formats on SmolLM2-135M (issue 25): FP4 e2m1 (LLMC's float-quant, g64), NVFP4 (e2m1, g16,
fp8 scales, global scale), MXFP4 (e2m1, g32, E8M0 scales), NF4 (g64) beside INT4 asym g64 and g16, each with
RTN and GPTQ. The P40 protocol of bench/weight_only.py: calibration 128 x 512 tokens of wiki.valid.tokens
(wikitext2_gptq), PPL on the first 40 x 2048 windows of wiki.test.raw in float32; GPTQ as the shipped config
(act order, static groups, mse ranges, bfloat16 block forwards).

    python bench/formats.py [--redo] [--only LABEL ...]     # writes bench/results/formats_smollm2.{json,md}
    python bench/formats.py --smoke MODEL_DIR [--only ...]  # every row on a small HF llama folder with tiny
                                                            # data sizes; prints the table, writes nothing
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from common import ROOT, render, run_table, run_row

NAME = "formats_smollm2"
TITLE = ("SmolLM2-135M-Instruct, weight-only 4-bit formats, calib 128 x 512 wiki.valid.tokens, PPL on "
         "wiki.test.raw first 40 x 2048 (float32 eval), CPU, llmc `bench/formats.py`")
RTN = "configs/quantization/methods/RTN/rtn_w_only.yml"
GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
# Both configs quantize INT4 asymmetric per_group g64; each format overrides what it changes.
FORMATS = {
    "INT4 asym g64": [],
    "INT4 asym g16": ["quant.weight.group_size=16"],
    "FP4 e2m1 g64": ["quant.weight.quant_type=float-quant", "quant.weight.bit=e2m1", "quant.weight.symmetric=True"],
    "NVFP4": ["quant.weight.quant_type=nvfp4", "quant.weight.bit=e2m1", "quant.weight.symmetric=True",
              "quant.weight.group_size=16"],
    "MXFP4": ["quant.weight.quant_type=mxfp4", "quant.weight.bit=e2m1", "quant.weight.symmetric=True",
              "quant.weight.group_size=32"],
    "NF4 g64": ["quant.weight.quant_type=nf4", "quant.weight.symmetric=True"],
}
ROWS = {f"{method} {fmt}": (config, overrides) for method, config in (("RTN", RTN), ("GPTQ", GPTQ))
        for fmt, overrides in FORMATS.items()}
ROWS["FP"] = (RTN, ["eval.eval_pos=[pretrain]"])
# --smoke: the same rows on a small model with tiny sizes, to check every row runs (not a measurement)
SMOKE = ["eval.eval_pos=[fake_quant]", "eval.num_samples=1", "eval.seq_len=64", "calib.n_samples=4", "calib.seq_len=64",
         "calib.bs=-1"]


def smoke(model_dir: str, only: list[str] | None) -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (config, overrides) in ROWS.items():
            if only and label not in only:
                continue
            extra = [f"model.path={model_dir}"] + [o for o in SMOKE if config == GPTQ or not o.startswith("calib.")]
            print(f"smoke {label} ...", flush=True)
            rows[label] = run_row((config, extra + overrides), [], Path(tmp) / re.sub(r"\W+", "_", label))
    print(render(rows, f"SMOKE (not a measurement): {model_dir}"))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--smoke", metavar="MODEL_DIR")
    a = parser.parse_args()
    if a.smoke:
        smoke(a.smoke, a.only)
    else:
        run_table(NAME, TITLE, ROWS, EVAL, a.redo, a.only)
