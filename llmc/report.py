"""The run's summary: a table on the terminal, results.json and results.md in the output folder."""
from __future__ import annotations

import resource
from pathlib import Path

from llmc.export.atomic import atomic_write_json, atomic_write_text


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary_table(evals: list[dict]) -> str:
    """The PPL table, then (when a run has lm-eval sections) a table of task metrics."""
    ppl = [e for e in evals if e.get("type", "ppl") == "ppl"]
    tasks = [e for e in evals if e.get("type") == "lm_eval"]
    other = [e for e in evals if e.get("type") in ("decode_ppl", "token_acc", "generate_only")]
    tune = [e for e in evals if e.get("type") == "tune"]
    return "\n\n".join(t for t in (_tune_table(tune) if tune else "", _ppl_table(ppl) if ppl else "",
                                    _lm_eval_table(tasks) if tasks else "", _other_table(other) if other else "") if t)


def _tune_table(evals: list[dict]) -> str:
    """Auto-tune's candidates (llmc/tune.py): held-out PPL, quantization seconds, the one kept."""
    rows = [("tune candidate", "held-out PPL", "quantize s", "windows x seq_len", "kept")]
    for e in evals:
        rows.append((e["candidate"], f"{e['ppl']:.4f}", f"{e['seconds']:.1f}", f"{e['windows']} x {e['seq_len']}",
                     "yes" if e["chosen"] else ""))
    return _grid(rows)


def _other_table(evals: list[dict]) -> str:
    """decode_ppl (PPL decoded through the KV cache), token_acc (agreement with the float model's argmax),
    generate_only (texts in results.json)."""
    rows = [("position", "type", "dataset", "value", "over")]
    for e in evals:
        if e["type"] == "generate_only":
            rows.append((e["pos"], e["type"], e["dataset"], f"{len(e['samples'])} texts", "results.json"))
        else:
            over = f"{e['tokens']} tokens" if e["type"] == "decode_ppl" else f"{e['windows']} x {e['seq_len']}"
            rows.append((e["pos"], e["type"], e["dataset"], f"{e['value']:.4f}", over))
    return _grid(rows)


def _ppl_table(evals: list[dict]) -> str:
    base = {e["dataset"]: e["ppl"] for e in evals if e["pos"] == "pretrain"}
    rows = [("position", "dataset", "PPL", "vs pretrain", "windows x seq_len")]
    for e in evals:
        ref = base.get(e["dataset"])
        delta = "" if ref is None or e["pos"] == "pretrain" else f"{100 * (e['ppl'] / ref - 1):+.2f}%"
        rows.append((e["pos"], e["dataset"], f"{e['ppl']:.4f}", delta, f"{e['windows']} x {e['seq_len']}"))
    return _grid(rows)


def _lm_eval_table(evals: list[dict]) -> str:
    # Task metrics (accuracies mostly) are compared to pretrain as absolute differences, not ratios.
    base = {(e["task"], e["metric"]): e["value"] for e in evals if e["pos"] == "pretrain"}
    rows = [("position", "task", "metric", "value", "± stderr", "vs pretrain", "shots, docs")]
    for e in evals:
        ref = base.get((e["task"], e["metric"]))
        delta = "" if ref is None or e["pos"] == "pretrain" else f"{e['value'] - ref:+.4f}"
        err = "" if e.get("stderr") is None else f"{e['stderr']:.4f}"
        rows.append((e["pos"], e["task"], e["metric"], f"{e['value']:.4f}", err, delta,
                     f"{e.get('num_fewshot')}, {e.get('samples')}"))
    return _grid(rows)


def _grid(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def write_results(results: dict, path: Path) -> None:
    atomic_write_json(path, results)
    timings = "\n".join(f"| {k} | {v:.1f} |" for k, v in results["timings"].items())
    cfg = results["config"]
    if cfg.get("tune"):
        kept = [e["candidate"] for e in results["evals"] if e.get("type") == "tune" and e["chosen"]]
        method = f"tune → {', '.join(kept)}"
    else:
        method = " → ".join(q["method"] for q in (cfg.get("stages") or [cfg["quant"]]))
    atomic_write_text(path.with_suffix(".md"), f"# llmc run: {method}\n\n"
                      f"{summary_table(results['evals'])}\n\n| phase | seconds |\n|---|---|\n{timings}\n\n"
                      f"Peak RSS: {results['peak_rss_mb']:.0f} MB\n"
                      + ("" if results.get("avg_bits") is None else
                         f"\nAverage bits per weight: {results['avg_bits']:.3f}\n"))
