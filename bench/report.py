"""One report over every bench table: each bench/results/NAME.json (rows written by common.run_table) becomes
a markdown table in REPORT.md, and every row whose label names a method and weight bits becomes a point of
ppl_vs_bits.png (PPL against weight bits, one line per method, FP as a horizontal line).

    python bench/report.py [--results DIR]   # default bench/results; writes DIR/REPORT.md and DIR/ppl_vs_bits.png

Labels parse as "METHOD W<bits>[A<bits>] [details]" ("GPTQ W3", "AWQ W4 (64 samples)", "SmoothQuant W6A6",
"OmniQuant W3 AWQ-init 5 ep") or as FP ("FP", "FP (llmc pretrain)"); other rows are listed in the tables
but left out of the chart.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_note  # noqa: E402  (bench/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = re.compile(r"^(?P<method>.+?)\s+W(?P<w>\d{1,2})(?:A(?P<a>\d{1,2}))?(?=$|[\s,(])(?P<rest>.*)$")
FP = re.compile(r"^FP(?=$|[\s,(])")


def parse_label(label: str) -> Optional[dict]:
    """method, weight bits, activation bits (None when weight-only; A16 counts as weight-only) and the chart
    series (the label without its bit widths: settings that differ only in bits share a line)."""
    text = label.strip()
    if FP.match(text):
        return {"method": "FP", "w_bits": None, "a_bits": None, "series": "FP"}
    m = LABEL.match(text)
    if not m or not 1 <= int(m["w"]) <= 16:
        return None
    w, a = int(m["w"]), int(m["a"]) if m["a"] else None
    a = None if a is not None and a >= 16 else a
    act = "" if a is None else ("W=A" if a == w else f"A{a}")
    series = " ".join(p for p in (m["method"].strip(), act, m["rest"].strip(" ,")) if p)
    return {"method": m["method"].strip(), "w_bits": w, "a_bits": a, "series": series}


def ppl_by_pos(label: str, row: dict) -> dict:
    """PPL per eval position. Rows from before run_row recorded `ppl_by_pos` hold one PPL: its position is the
    row's eval.eval_pos override, else pretrain for FP rows and fake_quant for the rest (the bench scripts'
    common settings)."""
    if row.get("ppl_by_pos"):
        return row["ppl_by_pos"]
    if "ppl" not in row:
        return {}
    pos = "pretrain" if re.search(r"\bFP\b", label) else "fake_quant"
    for o in row.get("overrides", []):
        if o.startswith("eval.eval_pos="):
            pos = o.split("=", 1)[1].strip("[] ").split(",")[0].strip() or pos
    return {pos: row["ppl"]}


def chart_ppl(label: str, row: dict) -> Optional[float]:
    """The PPL a row is charted with: the quantized model's when recorded."""
    by_pos = ppl_by_pos(label, row)
    value = by_pos.get("fake_quant", row.get("ppl"))
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def build_table(title: str, rows: dict) -> str:
    """One markdown table: method and bits from the label, PPL per eval position, times, memory, saved sizes."""
    order = ("pretrain", "transformed", "fake_quant", "fake_quant_wo_kv")
    found = {p for label, r in rows.items() for p in ppl_by_pos(label, r)}
    positions = [p for p in order if p in found] + sorted(found - set(order))
    fp = next((chart_ppl(k, r) or r.get("ppl") for k, r in rows.items() if FP.match(k.strip())), None)
    saves = any(r.get("saved_mb") for r in rows.values())  # a column only where some row saved something
    header = ["run", "method", "W", "A"] + [f"PPL {p}" for p in positions] + [
        "vs FP", "quantize s", "process wall s", "peak RSS MB"] + (["saved MB"] if saves else [])
    body = []
    for label, r in rows.items():
        parsed = parse_label(label) or {}
        by_pos, ppl = ppl_by_pos(label, r), chart_ppl(label, r)
        delta = f"{100 * (ppl / fp - 1):+.2f}%" if fp and ppl and parsed.get("method") != "FP" else ""
        saved = ", ".join(f"{k} {v:.0f}" for k, v in (r.get("saved_mb") or {}).items())
        body.append([label, parsed.get("method", "?"), _num(parsed.get("w_bits"), "d"), _num(parsed.get("a_bits"), "d")]
                    + [_num(by_pos.get(p), ".3f") for p in positions]
                    + [delta, _num(r.get("quantize_s"), ".1f"), _num(r.get("wall_s", r.get("seconds")), ".0f"),
                       _num(r.get("peak_rss_mb"), ".0f")] + ([saved] if saves else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in b) + " |" for b in body]
    note = machine_note(rows)
    return f"## {title}\n\n" + "\n".join(lines) + (f"\n\n{note}" if note else "")


def chart_points(tables: dict) -> tuple[dict, list]:
    """series → sorted [(weight bits, PPL)], and the distinct FP PPLs, over every table."""
    series: dict[str, list] = {}
    fps: list[float] = []
    for rows in tables.values():
        for label, r in rows.items():
            parsed, ppl = parse_label(label), chart_ppl(label, r)
            if parsed is None or ppl is None:
                continue
            if parsed["method"] == "FP":
                if all(abs(ppl - f) > 1e-3 * f for f in fps):
                    fps.append(ppl)
            else:
                series.setdefault(parsed["series"], []).append((parsed["w_bits"], ppl))
    return {k: sorted(v) for k, v in series.items()}, fps


def write_chart(series: dict, fps: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, points in sorted(series.items()):
        ax.plot([b for b, _ in points], [p for _, p in points], "o-", label=name)
    for f in fps:
        ax.axhline(f, color="gray", linestyle="--", linewidth=1, label=f"FP ({f:.2f})")
    bits = sorted({b for pts in series.values() for b, _ in pts})
    ax.set_xticks(bits or [4])
    ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("PPL (log scale)")
    ax.set_title("PPL against weight bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_tables(results: Path) -> dict:
    """name → rows for every JSON of run_table rows (a dict of dicts) in `results`."""
    tables = {}
    for path in sorted(results.glob("*.json")):
        rows = json.loads(path.read_text())
        if isinstance(rows, dict) and rows and all(isinstance(r, dict) for r in rows.values()):
            tables[path.stem] = rows
    return tables


def title_of(results: Path, name: str) -> str:
    """The title run_table wrote as the first line of NAME.md, else the name."""
    md = results / f"{name}.md"
    first = md.read_text().splitlines()[0].strip() if md.exists() else ""
    return f"{name}: {first}" if first and not first.startswith("|") else name


def main(results: Path = RESULTS) -> tuple[Path, Path]:
    tables = load_tables(results)
    parts = ["# Benchmark report", "Generated by `python bench/report.py` from bench/results/*.json; the chart "
             "(`ppl_vs_bits.png`) plots each parsed row's fake_quant PPL against its weight bits."]
    parts += [build_table(title_of(results, name), rows) for name, rows in tables.items()]
    report, chart = results / "REPORT.md", results / "ppl_vs_bits.png"
    report.write_text("\n\n".join(parts) + "\n\n![PPL against weight bits](ppl_vs_bits.png)\n")
    write_chart(*chart_points(tables), chart)
    return report, chart


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    for written in main(parser.parse_args().results):
        print(f"wrote {written}")
