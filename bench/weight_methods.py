"""HQQ, OWQ, Norm Tweaking and SpQR on SmolLM2-135M beside the methods they refine (issue 26), on the P40 protocol
of bench/weight_only.py: asymmetric g64, calibration 128 x 512 tokens of wiki.valid.tokens, PPL on the first
40 x 2048 windows of wiki.test.raw. Each row states the average bits per weight of the decoder linears
(codes, float16 scales, zero points at the code width or float16 when float, OWQ's float16 columns); SpQR's
rows and the GPTQ rows beside them take the count the run reports (llmc/quant/bits.py: SpQR's 3-bit
statistics, their 16-bit second-level scales and zeros, 32 bits per outlier; for both, act order's 32-bit
group index per input column). SpQR runs LLMC's config (groups of 16, act order, percdamp 1,
relative_threshold 0.2): b + 6/16 + 4/16 bits of codes and statistics, plus ~0.6 bits of outliers (1.6-2.2%
of the weights at W3 on block 0: 4.24 bits in all). GPTQ beside it takes the same solver settings, with
groups of 32 at the same code bits (b + (16 + b)/32) and with the grid of about SpQR's total (W4 g96 4.21,
W5 g96 5.22, before the index; 128 does not divide 576).

    python bench/weight_methods.py [--redo] [--only LABEL ...]   # writes bench/results/weight_methods_smollm2.{json,md}
    python bench/weight_methods.py --dry-run                       # validates every row (llmc --dry-run) and prints bits
"""
from __future__ import annotations

import math
import subprocess
import sys

from common import DATA, ROOT, WORK, load_rows, machine_note, markdown, run_row, save_rows

NAME = "weight_methods_smollm2"
TITLE = ("SmolLM2-135M-Instruct, weight-only asym g64, calib 128 x 512 wiki.valid.tokens, PPL on wiki.test.raw "
         "first 40 x 2048, CPU, llmc `bench/weight_methods.py`")
RTN = "configs/quantization/methods/RTN/rtn_w_only.yml"
HQQ = "configs/quantization/methods/HQQ/hqq_w_only.yml"
GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
OWQ = "configs/quantization/methods/GPTQ/gptq_owq_w_only.yml"
NTWEAK = "configs/quantization/methods/NormTweaking/ntweak_w_only.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
SPQR = "configs/quantization/methods/SpQR/spqr_w_only.yml"
# the shipped GPTQ config with SpQR's solver settings: act order (groups in act order), percdamp 1, float32
# forwards, minmax ranges, quantized inputs to the next block (quant_out)
SPQR_GPTQ = ["model.compute_dtype=float32", "quant.weight.calib_algo=minmax", "quant.special.actorder=True",
             "quant.special.static_groups=False", "quant.special.percdamp=1", "quant.quant_out=True"]
AUTO_MIX = "configs/quantization/methods/MixPrecision/gptq_auto_mix_bits.yml"
HAND_MIX = ("quant.mix_bits={setting_0: {layer_name: [self_attn, down_proj], weight: {bit: 4, symmetric: False, "
            "granularity: per_group, group_size: 64, calib_algo: mse}}}")
OWQ_OUTS = [4, 4, 4, 4, 4, 4, 8]  # the shipped OWQ config's n_outs (q, k, v, o, gate, up, down)
# row: (config, overrides, bits per weight as (code bits, float zero points, n_outs or None), or "measured": the
# run's own count); FP is 16 bits
ROWS = {
    "FP": (RTN, ["eval.eval_pos=[pretrain]"], None),
    "RTN W4": (RTN, [], (4, False, None)),
    # HQQ's own baseline: the same min/max grid with its exact (float) zero point, before any HQQ step; zero
    # is then off the grid, which costs this model more at 3 bits than the range fit gains
    "RTN W4 (float zero points)": (RTN, ["quant.weight.round_zp=False"], (4, True, None)),
    "HQQ W4 (float zero points)": (HQQ, [], (4, True, None)),
    "HQQ W4 (round_zp: True)": (HQQ, ["quant.weight.round_zp=True"], (4, False, None)),
    "RTN W3": (RTN, ["quant.weight.bit=3"], (3, False, None)),
    "RTN W3 (float zero points)": (RTN, ["quant.weight.bit=3", "quant.weight.round_zp=False"], (3, True, None)),
    "HQQ W3 (float zero points)": (HQQ, ["quant.weight.bit=3"], (3, True, None)),
    # OWQ against the same GPTQ (no act order, min/max groups): n_outs 0 keeps no column float
    "GPTQ W4 (OWQ's settings, n_outs 0)": (OWQ, ["quant.special.n_outs=0"], (4, False, None)),
    "OWQ W4": (OWQ, [], (4, False, OWQ_OUTS)),
    "GPTQ W3 (OWQ's settings, n_outs 0)": (OWQ, ["quant.weight.bit=3", "quant.special.n_outs=0"], (3, False, None)),
    "OWQ W3": (OWQ, ["quant.weight.bit=3"], (3, False, OWQ_OUTS)),
    # Norm Tweaking on the shipped GPTQ (act order, static groups, mse ranges), both in float32 forwards
    "GPTQ W4 (act order, mse), float32": (GPTQ, ["model.compute_dtype=float32"], (4, False, None)),
    "NormTweaking W4 after that GPTQ": (NTWEAK, [], (4, False, None)),
    "GPTQ W3 (act order, mse), float32": (GPTQ, ["model.compute_dtype=float32", "quant.weight.bit=3"], (3, False, None)),
    "NormTweaking W3 after that GPTQ": (NTWEAK, ["quant.weight.bit=3"], (3, False, None)),
    # SpQR (LLMC's config) beside GPTQ with its solver settings: at the same weight bits (groups of 32: the
    # statistics cost of SpQR's groups of 16 with 3-bit statistics) and at about SpQR's average bits, outliers
    # included (SpQR W3 measured 4.24 on block 0, 1.6-2.2% outliers; W4 about 1 bit more)
    "GPTQ W3 g32 (SpQR's solver settings)": (GPTQ, SPQR_GPTQ + ["quant.weight.bit=3", "quant.weight.group_size=32"],
                                             "measured"),
    "GPTQ W4 g96 (SpQR's solver settings)": (GPTQ, SPQR_GPTQ + ["quant.weight.group_size=96"], "measured"),
    "SpQR W3 (g16, 3-bit statistics, outliers)": (SPQR, ["quant.weight.bit=3"], "measured"),
    "GPTQ W4 g32 (SpQR's solver settings)": (GPTQ, SPQR_GPTQ + ["quant.weight.group_size=32"], "measured"),
    "GPTQ W5 g96 (SpQR's solver settings)": (GPTQ, SPQR_GPTQ + ["quant.weight.bit=5", "quant.weight.group_size=96"],
                                              "measured"),
    "SpQR W4 (g16, 3-bit statistics, outliers)": (SPQR, [], "measured"),
    # 3- and 4-bit linears at 3.8 bits per weight, beside the uniform GPTQ W3/W4 rows above (same settings): the
    # widths chosen from the data (quant.auto_mix_bits, output error per bit on 32 samples) against a hand
    # choice of the same size, attention and down_proj at 4 bits (half the weights: 3.805), the linears
    # llama.cpp's 3-bit K-quant mixes favour
    "GPTQ 3/4-bit by output error per bit (auto_mix_bits 3.8), float32": (AUTO_MIX, ["model.compute_dtype=float32"],
                                                                          "measured"),
    "GPTQ 3/4-bit, attention and down_proj at 4, float32": (GPTQ, ["model.compute_dtype=float32", "quant.weight.bit=3",
                                                                   HAND_MIX], "measured"),
}

# SmolLM2-135M's decoder linears, (out, in) in the adapter's order: q, k, v, o, gate, up, down (30 blocks alike)
LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
GROUP = 64


def bits_per_weight(spec) -> float:
    """Average stored bits per weight of the decoder linears: codes, one float16 scale and one zero point
    (code-wide, or float16 when float) per group of the quantized columns, float16 for OWQ's columns.
    Act order's group index (32 bits per input column) is left out, as in the rows before it."""
    if spec is None:
        return 16.0
    if spec == "measured":
        return math.nan
    bit, float_zero, n_outs = spec
    total = stored = 0
    for k, (out, inp) in enumerate(LINEARS):
        n = n_outs[k] if n_outs else 0
        groups = math.ceil((inp - n) / GROUP)
        stored += out * ((inp - n) * bit + n * 16 + groups * (16 + (16 if float_zero else bit)))
        total += out * inp
    return stored / total


def render(rows: dict) -> str:
    fp = rows.get("FP", {}).get("ppl")
    body = []
    for label, r in rows.items():
        delta = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp and label != "FP" else ""
        bits = bits_per_weight(ROWS[label][2]) if label in ROWS else math.nan
        bits = r["avg_bits"] if math.isnan(bits) and r.get("avg_bits") else bits
        body.append([label, "" if math.isnan(bits) else f"{bits:.3f}", f"{r['ppl']:.3f}",
                     delta, f"{r.get('quantize_s', 0):.1f}", f"{r.get('wall_s', 0):.0f}", f"{r.get('peak_rss_mb', 0):.0f}"])
    table = markdown(["run", "bits/weight", "PPL", "vs FP", "quantize s", "process wall s", "peak RSS MB"], body)
    note = machine_note(rows)
    return f"{TITLE}\n\n{table}" + (f"\n\n{note}" if note else "")


def dry_run() -> int:
    """Every row's config and overrides through `llmc --dry-run` (config checks, no weights loaded)."""
    failed = 0
    for label, (config, overrides, spec) in ROWS.items():
        cmd = [sys.executable, "-m", "llmc", "--config", config, "--dry-run"]
        for o in EVAL + overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                                   "LLMC_DATA": DATA})
        ok = proc.returncode == 0
        failed += not ok
        bits = "measured in the run" if spec == "measured" else f"{bits_per_weight(spec):.3f}"
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {bits} bits/weight"
              + ("" if ok else f"\n{proc.stderr[-1500:]}"), flush=True)
    return 1 if failed else 0


def main() -> int:
    import argparse
    import re

    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--dry-run", action="store_true")
    a = parser.parse_args()
    if a.dry_run:
        return dry_run()
    unknown = sorted(set(a.only or []) - set(ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown row label(s) {unknown}; expected some of {list(ROWS)}")
    rows = load_rows(NAME)
    for label, (config, overrides, _) in ROWS.items():
        if (a.only and label not in a.only) or (label in rows and not a.redo):
            continue
        print(f"running {label} ...", flush=True)
        work = WORK / NAME / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        rows[label] = run_row((config, overrides), EVAL, work)
        rows = {k: rows[k] for k in ROWS if k in rows}
        save_rows(NAME, rows, render(rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
