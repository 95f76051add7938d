"""bench/report.py on a synthetic results folder: label parsing, the markdown table, the chart."""
import importlib.util
import json
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "bench" / "report.py"
_spec = importlib.util.spec_from_file_location("bench_report", _path)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


@pytest.mark.parametrize("label, method, w, a, series", [
    ("GPTQ W3", "GPTQ", 3, None, "GPTQ"),
    ("AWQ W4 (64 samples)", "AWQ", 4, None, "AWQ (64 samples)"),
    ("SmoothQuant W6A6", "SmoothQuant", 6, 6, "SmoothQuant W=A"),
    ("SmoothQuant W4A4 (alpha search)", "SmoothQuant", 4, 4, "SmoothQuant W=A (alpha search)"),
    ("OmniQuant W3 AWQ-init 5 ep", "OmniQuant", 3, None, "OmniQuant AWQ-init 5 ep"),
    ("AWQ -> OmniQuant W2 g64, 5 epochs", "AWQ -> OmniQuant", 2, None, "AWQ -> OmniQuant g64, 5 epochs"),
    ("RTN W4A16 g64 asym minmax", "RTN", 4, None, "RTN g64 asym minmax"),  # A16: weight-only
    ("RTN W4A8", "RTN", 4, 8, "RTN A8"),
    ("FP", "FP", None, None, "FP"),
    ("FP (llmc pretrain)", "FP", None, None, "FP"),
])
def test_parse_label(label, method, w, a, series):
    assert report.parse_label(label) == {"method": method, "w_bits": w, "a_bits": a, "series": series}


@pytest.mark.parametrize("label", ["plain transformers FP (same windows)", "baseline", "W4", "FPGA W4x", "GPTQ W99"])
def test_unparsed_labels(label):
    assert report.parse_label(label) is None


ROWS = {
    "GPTQ W4": {"ppl": 24.0, "quantize_s": 360.0, "wall_s": 566.0, "peak_rss_mb": 2665.0, "overrides": []},
    "GPTQ W3": {"ppl": 40.0, "ppl_by_pos": {"pretrain": 20.0, "fake_quant": 40.0}, "quantize_s": 256.0,
                "wall_s": 451.0, "peak_rss_mb": 2757.0, "saved_mb": {"fake_quant_model": 540.4}, "overrides": []},
    "mystery run": {"ppl": 30.0, "wall_s": 10.0},
    "FP": {"ppl": 20.0, "quantize_s": 0.1, "wall_s": 300.0, "peak_rss_mb": 1900.0,
           "overrides": ["eval.eval_pos=[pretrain]"]},
}


def test_table_columns_and_rows():
    table = report.build_table("synthetic", ROWS)
    lines = table.splitlines()
    assert lines[0] == "## synthetic"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["run", "method", "W", "A", "PPL pretrain", "PPL fake_quant", "vs FP", "quantize s",
                      "process wall s", "peak RSS MB", "saved MB"]
    split = ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])
    cells = {r[0]: dict(zip(header, r)) for r in split}
    assert set(cells) == set(ROWS)  # unparsed rows stay in the table
    assert cells["GPTQ W3"]["PPL pretrain"] == "20.000" and cells["GPTQ W3"]["PPL fake_quant"] == "40.000"
    assert cells["GPTQ W3"]["vs FP"] == "+100.00%" and cells["GPTQ W3"]["saved MB"] == "fake_quant_model 540"
    assert cells["GPTQ W4"]["PPL fake_quant"] == "24.000" and cells["GPTQ W4"]["PPL pretrain"] == ""
    assert cells["FP"]["PPL pretrain"] == "20.000" and cells["FP"]["vs FP"] == ""  # position from its override
    assert cells["mystery run"]["method"] == "?" and cells["mystery run"]["peak RSS MB"] == ""


def test_rows_from_different_machines_are_named():
    rows = {**ROWS, "GPTQ W2": {"ppl": 90.0, "quantize_s": 200.0, "machine": "AMD EPYC, 2 cores, avx512_bf16"}}
    note = report.build_table("synthetic", rows).split("\n\n")[-1]
    assert note.startswith("Machines") and "AMD EPYC, 2 cores, avx512_bf16: 'GPTQ W2'" in note
    assert "GPTQ W3" not in note and "not recorded" in note
    assert "Machines" not in report.build_table("synthetic", ROWS)  # no row recorded one: no note


def test_chart_points_leave_out_unparsed():
    series, fps = report.chart_points({"t": ROWS})
    assert series == {"GPTQ": [(3, 40.0), (4, 24.0)]} and fps == [20.0]


def test_main_writes_report_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "synthetic.json").write_text(json.dumps(ROWS))
    (tmp_path / "synthetic.md").write_text("A synthetic title\n\n| run |\n")
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a results table: skipped
    md, png = report.main(tmp_path)
    text = md.read_text()
    assert "## synthetic: A synthetic title" in text and "notes" not in text and "| GPTQ W3 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
