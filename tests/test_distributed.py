"""Data-parallel calibration: two CPU processes (gloo, launched by torchrun) give the one-process result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmc.cli import main

W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True}
CASES = {
    "RTN": ({"method": "RTN", "weight": W3}, 1.0),
    "GPTQ": ({"method": "GPTQ", "weight": W3, "special": {"actorder": True, "static_groups": True}}, 0.999),
    # clip_sym False: a ±absmax clip under an asymmetric grid puts the zero point on a rounding tie (as
    # AutoAWQ's does), which float noise between one and two processes may break either way.
    "Awq": ({"method": "Awq", "weight": W3, "special": {"trans_version": "v2", "weight_clip": True,
                                                        "clip_sym": False}}, 0.999),
    "SmoothQuant": ({"method": "SmoothQuant", "weight": W8, "act": A8, "special": {"alpha_search": True}}, 0.999),
    "OmniQuant": ({"method": "OmniQuant", "quant_out": True, "weight": {**W3, "calib_algo": "learnable", "ste": True},
                   "special": {"lwc": True, "let": True, "epochs": 1}}, 0.999),
    # the same global mini-batches on both processes, each taking the samples it holds
    "SignRound": ({"method": "SignRound", "weight": W3, "special": {"iters": 4, "batch_size": 3}}, 0.999),
    # each process measures the output errors on its samples; summed, every process picks the same widths
    "GPTQ auto_mix_bits": ({"method": "GPTQ", "weight": W3, "special": {"actorder": True, "static_groups": True},
                            "auto_mix_bits": {"avg_bits": 3.3, "options": [2, 3, 4]}}, 0.999),
    "TesseraQ": ({"method": "TesseraQ", "weight": W3, "quant_out": True,
                  "special": {"iterations": 3, "batch_size": 3, "thresholds": [0.5, 0.1], "lr": 0.005}}, 0.999),
}


def _config(make_config, wiki_files, tmp_path, name, quant):
    path = make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 32,
                                  "bs": 4},
                        "eval": {"eval_pos": ["fake_quant"]},
                        "save": {"save_path": str(tmp_path / name), "save_fake": True}}, name=f"{name}.yml")
    raw = yaml.safe_load(open(path))
    raw["quant"] = quant
    Path(path).write_text(yaml.safe_dump(raw))
    return path


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "llmc",
           *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / "fake_quant_model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_two_processes_match_one(make_config, wiki_files, tmp_path, method):
    quant, min_equal = CASES[method]
    one = _config(make_config, wiki_files, tmp_path, "one", quant)
    assert main(["--config", one]) == 0
    two = _config(make_config, wiki_files, tmp_path, "two", quant)
    proc = torchrun(2, "--config", two)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    linears = [k for k in a if k.startswith("model.layers.") and a[k].dim() == 2]
    assert linears
    # A different integer code moves a weight by a whole grid step; float summation order only by ulps.
    same = sum(((a[k] - b[k]).abs() <= 1e-3 * a[k].abs().amax(1, keepdim=True)).sum().item() for k in linears)
    total = sum(a[k].numel() for k in linears)
    assert same / total >= min_equal, f"{method}: {same / total:.5f} of codes equal"
    ppl = [json.loads((tmp_path / n / "results.json").read_text())["evals"][0]["ppl"] for n in ("one", "two")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


def test_rank_zero_alone_writes_and_logs(make_config, wiki_files, tmp_path):
    """Through the launcher script, as a user runs it."""
    cfg = _config(make_config, wiki_files, tmp_path, "two", CASES["GPTQ"][0])
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_llmc.sh"
    proc = subprocess.run(["bash", str(script), "--nproc", "2", cfg], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fake_quant") == 1  # one summary table, from rank 0
    assert "2 processes" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["fake_quant_model", "results.json", "results.md"]


def test_batch_smaller_than_the_process_count_is_refused_where_batching_matters(make_config, wiki_files, tmp_path):
    cfg = _config(make_config, wiki_files, tmp_path, "two", CASES["OmniQuant"][0])
    proc = torchrun(2, "--config", cfg, "--set", "calib.bs=1")
    assert proc.returncode != 0
    assert "calib.bs" in proc.stderr and "expected bs >= 2" in proc.stderr and "OmniQuant" in proc.stderr


def test_gptq_with_batches_of_one_runs_on_two_processes_as_on_one(make_config, wiki_files, tmp_path):
    """LLMC's GPTQ configs say calib.bs: 1; the Hessian is a sum over samples, so two processes take
    the samples two at a time and must give the one-process result."""
    quant, min_equal = CASES["GPTQ"]
    one = _config(make_config, wiki_files, tmp_path, "one", quant)
    assert main(["--config", one, "--set", "calib.bs=1"]) == 0
    two = _config(make_config, wiki_files, tmp_path, "two", quant)
    proc = torchrun(2, "--config", two, "--set", "calib.bs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in batches of 2" in proc.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    same = sum(((a[k] - b[k]).abs() <= 1e-3 * a[k].abs().amax(1, keepdim=True)).sum().item() for k in a if a[k].dim() == 2)
    assert same / sum(a[k].numel() for k in a if a[k].dim() == 2) >= min_equal


@pytest.mark.parametrize("bs,n,world,want", [(4, 8, 2, 4), (-1, 8, 2, -1), (1, 8, 2, 2), (1, 9, 2, 3), (3, 8, 4, 4),
                                             (1, 7, 3, 4)])
def test_invariant_methods_get_the_smallest_batch_that_feeds_every_process(bs, n, world, want):
    from llmc.engine.distributed import batch_size

    got = batch_size(bs, n, world, "GPTQ", invariant=True)
    assert got == want
    size = n if got == -1 else got
    assert all(min(size, n - start) >= world for start in range(0, n, size))  # every batch feeds every process


def test_two_processes_resume_a_killed_run(make_config, wiki_files, tmp_path, monkeypatch):
    """Killed after block 0 in one process, resumed with two: rank 0 writes the checkpoint, both read it."""
    from test_resume import Crash, _crash_after

    quant, min_equal = CASES["GPTQ"]
    one = _config(make_config, wiki_files, tmp_path, "one", quant)
    assert main(["--config", one]) == 0
    cut = _config(make_config, wiki_files, tmp_path, "cut", quant)
    with monkeypatch.context() as m:
        _crash_after(m, 0, 0)
        with pytest.raises(Crash):
            main(["--config", cut])
    proc = torchrun(2, "--config", cut, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 0: 1 blocks" in proc.stderr
    assert not (tmp_path / "cut" / ".llmc_resume").exists()
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "cut")
    same = sum(((a[k] - b[k]).abs() <= 1e-3 * a[k].abs().amax(1, keepdim=True)).sum().item() for k in a if a[k].dim() == 2)
    assert same / sum(a[k].numel() for k in a if a[k].dim() == 2) >= min_equal
