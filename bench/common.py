"""Shared bench machinery: run llmc configs as subprocesses under /usr/bin/time -v, collect PPL,
timings and peak RSS, keep finished rows in a JSON file (so a long matrix resumes across sessions),
and render a markdown table."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = os.environ.get("LLMC_DATA", str(ROOT.parent / "shared" / "data"))


def run_llmc(config: str, overrides: list[str], save_path: str | None = None, nproc: int = 1) -> dict:
    """One llmc run (nproc > 1: data parallel under torchrun); returns its results.json plus the wall time
    and peak RSS (of the largest process) of the whole run. A save_path holding an interrupted run's
    checkpoint is resumed (--resume), and the quantize time spent before the interruption is added."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    resume = save_path is not None and (Path(save_path) / ".llmc_resume" / "manifest.json").is_file()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        cmd = ["/usr/bin/time", "-v", sys.executable, *launcher, "-m", "llmc", "--config", config,
               "--results", str(results), "--set", f"save.save_path={save_path or tmp + '/save'}",
               "--resume" if resume else "--overwrite"]
        if resume:
            print(f"  resuming the interrupted run in {save_path}", flush=True)
        for o in overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "LLMC_DATA": DATA})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(results.read_text())
        out["saved_mb"] = saved_mb(Path(save_path or tmp + "/save"))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    out["process_wall_s"] = _seconds(wall)
    out["process_peak_rss_mb"] = rss_kb / 1024
    out["resumed"] = resume
    return out


def machine() -> str:
    """The CPU a row ran on (model name, the cores this process may use, bf16 matmul support): sessions land on
    different machines, and a row's times compare only with rows from the same one."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ", ".join([model.group(1).strip() if model else "unknown CPU", f"{cores} cores"] + bf16)


def machine_note(rows: dict) -> str:
    """A footnote naming the machine of each row that recorded one ('' when none did)."""
    by_machine: dict[str, list[str]] = {}
    for label, r in rows.items():
        by_machine.setdefault(r.get("machine", ""), []).append(label)
    if set(by_machine) == {""}:
        return ""
    parts = [f"{m}: {', '.join(repr(label) for label in labels)}" for m, labels in by_machine.items() if m]
    if "" in by_machine:
        parts.append("the other rows: not recorded (rows from before the bench recorded machines)")
    return "Machines (times compare only within one machine). " + "; ".join(parts)


def quantize_seconds(results: dict) -> float:
    """The run's quantize time, with what an interrupted earlier attempt spent on its finished blocks."""
    t = results["timings"]
    return t.get("quantize", 0.0) + t.get("quantize, before resuming", 0.0)


def saved_mb(folder: Path) -> dict:
    """MB of each entry the run saved (fake_quant_model/, transformed_model/, state files); {} when none."""
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    return {p.name: size(p) / 2**20 for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def load_rows(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_rows(name: str, rows: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(rows: dict, title: str, fp_label: str = "FP") -> str:
    fp = next((r["ppl"] for label, r in rows.items() if label.startswith(fp_label)), None)
    body = []
    for label, r in rows.items():
        delta = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp and r["ppl"] and not label.startswith(fp_label) else ""
        body.append([label + (" †" if r.get("resumed") else ""), "-" if r["ppl"] is None else f"{r['ppl']:.3f}", delta, f"{r.get('quantize_s', 0):.1f}",
                     f"{r.get('wall_s', r.get('seconds', 0)):.0f}", f"{r.get('peak_rss_mb', 0):.0f}"])
    table = markdown(["run", "PPL", "vs FP", "quantize s", "process wall s", "peak RSS MB"], body)
    if any(r.get("resumed") for r in rows.values()):
        table += ("\n\n† interrupted and resumed from its checkpoint: quantize s adds the time "
                  "the interrupted attempt spent on its committed blocks; wall and RSS are the resumed process's")
    note = machine_note(rows)
    if note:
        table += "\n\n" + note
    return f"{title}\n\n{table}"


WORK = ROOT / "bench" / ".work"  # rows in progress (git-ignored): an interrupted row resumes from here


def run_row(spec, common: list[str], work: Path) -> dict:
    """A row is (config, overrides[, processes]), or a list of them run in order (AWQ step 1 → OmniQuant
    step 2): the steps share the work folder, named `{work}` in their overrides; the row reports the last
    step's PPL, the summed quantize and wall times and the largest peak RSS. A finished step's results are
    kept in the work folder and an interrupted one resumes from its checkpoint, so a row longer than a
    session finishes over several; the folder is removed when the row is done."""
    steps = spec if isinstance(spec, list) else [spec]
    results = []
    for i, step in enumerate(steps):
        done = work / f"step{i}.bench.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        res = run_llmc(step[0], common + [o.replace("{work}", str(work)) for o in step[1]], f"{work}/step{i}", *step[2:])
        done.write_text(json.dumps(res))
        results.append(res)
    shutil.rmtree(work, ignore_errors=True)
    last = results[-1]
    ppl = [e for e in last["evals"] if "ppl" in e]  # lm-eval rows carry metrics, not PPL
    return {"ppl": ppl[0]["ppl"] if ppl else None,  # None: a row that evaluates nothing (cost only)
            "ppl_by_pos": {e["pos"]: e["ppl"] for e in reversed(ppl)},  # first per pos
            "quantize_s": sum(quantize_seconds(r) for r in results),
            "resumed": any(r.get("resumed") for r in results),
            "wall_s": sum(r["process_wall_s"] for r in results),
            "peak_rss_mb": max(r["process_peak_rss_mb"] for r in results),
            "steps_quantize_s": [quantize_seconds(r) for r in results],
            "saved_mb": last["saved_mb"],
            "avg_bits": last.get("avg_bits"),  # llmc's own count (llmc/quant/bits.py), when the run reports it
            "machine": machine(),
            "overrides": [o for step in steps for o in step[1]]}


def check_only(only: list[str] | None, labels) -> None:
    """Refuse --only labels that name no row, before anything runs."""
    unknown = sorted(set(only or []) - set(labels))
    if unknown:
        raise SystemExit(f"--only: unknown row label(s) {unknown}; expected some of {list(labels)}")


def run_table(name: str, title: str, rows_spec: dict, common: list[str], redo: bool = False,
              only: list[str] | None = None) -> dict:
    """Run every row not yet in bench/results/NAME.json (all with redo; the exact labels in only), saving after each."""
    check_only(only, rows_spec)
    rows = load_rows(name)
    for label, spec in rows_spec.items():
        if only and label not in only:
            continue
        if label in rows and not redo:
            continue
        print(f"running {label} ...", flush=True)
        # a callable row runs something other than llmc (a peer toolkit) and returns the same fields
        row = spec() if callable(spec) else run_row(spec, common,
                                                    WORK / name / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_"))
        rows = {**load_rows(name), label: row}  # rows another process saved meanwhile are kept
        ordered = {k: rows[k] for k in rows_spec if k in rows}
        ordered.update({k: v for k, v in rows.items() if k not in ordered})
        rows = ordered
        save_rows(name, rows, render(rows, title))
    print(render(rows, title))
    return rows


def table_main(name: str, title: str, rows_spec: dict, common: list[str]) -> dict:
    """The command line every row-table bench shares: [--redo] [--only LABEL ...]."""
    import argparse

    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    a = parser.parse_args()
    return run_table(name, title, rows_spec, common, a.redo, a.only)
