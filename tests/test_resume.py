"""Resume: a run killed after block k and resumed equals an uninterrupted run bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmc.cli import main
from llmc.engine.checkpoint import Checkpoint

CALIB = {"name": "wikitext2", "n_samples": 8, "seq_len": 32, "bs": 2}
GPTQ = {"method": "GPTQ", "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32},
        "special": {"actorder": True, "static_groups": True}}
OMNI = {"method": "OmniQuant", "quant_out": True,
        "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32,
                   "calib_algo": "learnable", "ste": True},
        "special": {"lwc": True, "let": True, "epochs": 2}}
AWQ_THEN_OMNI = [
    {"method": "Awq", "quant_out": True, "weight": OMNI["weight"] | {"ste": False},
     "special": {"trans_version": "v2"}},
    {**OMNI, "special": {"lwc": True, "epochs": 1, "load_clip": True}},
]


class Crash(Exception):
    pass


def _config(make_config, wiki_files, tmp_path, name, quant, save_path):
    path = make_config({"calib": {**CALIB, "path": wiki_files["valid"]},
                        "eval": {"eval_pos": ["pretrain", "fake_quant"]},
                        "save": {"save_path": str(save_path), "save_fake": True}}, name=name)
    raw = yaml.safe_load(open(path))
    if isinstance(quant, list):
        del raw["quant"]
        raw["stages"] = quant
    else:
        raw["quant"] = quant
    Path(path).write_text(yaml.safe_dump(raw))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / "fake_quant_model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ppl(folder: Path) -> list[float]:
    return [e["ppl"] for e in json.loads((folder / "results.json").read_text())["evals"]]


def _crash_after(monkeypatch, stage: int, block: int):
    real = Checkpoint.block_done

    def block_done(self, s, i, module, stream):
        real(self, s, i, module, stream)
        if (s, i) == (stage, block):
            raise Crash(f"killed after stage {s} block {i}")

    monkeypatch.setattr(Checkpoint, "block_done", block_done)


def _time_quantize(monkeypatch) -> list:
    """[start, end] of every quantize pass (end None while it runs), measured around llmc's own."""
    import llmc.run

    spans, real = [], llmc.run.quantize_blocks

    def timed(*args, **kwargs):
        spans.append([time.perf_counter(), None])
        out = real(*args, **kwargs)
        spans[-1][1] = time.perf_counter()
        return out

    monkeypatch.setattr(llmc.run, "quantize_blocks", timed)
    return spans


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _ppl(a) == _ppl(b)


# auto_mix_bits: the budget left after the replayed blocks is what the uninterrupted run had there
GPTQ_AUTO = {**GPTQ, "auto_mix_bits": {"avg_bits": 3.2, "options": [2, 4]}}


@pytest.mark.parametrize("quant,stage,block", [(GPTQ, 0, 1), (OMNI, 0, 0), (AWQ_THEN_OMNI, 1, 1), (GPTQ_AUTO, 0, 0)],
                         ids=["gptq", "omniquant", "awq-then-omniquant", "gptq-auto-mix-bits"])
def test_killed_run_resumes_to_the_same_result(make_config, wiki_files, tmp_path, monkeypatch, quant, stage, block):
    full = _config(make_config, wiki_files, tmp_path, "full.yml", quant, tmp_path / "full")
    assert main(["--config", full]) == 0
    assert not (tmp_path / "full" / ".llmc_resume").exists()  # a finished run removes its checkpoint

    cut = _config(make_config, wiki_files, tmp_path, "cut.yml", quant, tmp_path / "cut")
    with monkeypatch.context() as m:
        _crash_after(m, stage, block)
        spent = _time_quantize(m)
        with pytest.raises(Crash):
            main(["--config", cut])
        crashed = time.perf_counter()
    assert (tmp_path / "cut" / ".llmc_resume" / "manifest.json").is_file()
    assert not (tmp_path / "cut" / "fake_quant_model").exists()
    assert main(["--config", cut]) == 2  # not empty: the error points at --resume
    assert main(["--config", cut, "--resume"]) == 0
    _assert_same(tmp_path / "full", tmp_path / "cut")
    # the quantize time spent before the crash is reported, not lost (benches sum it with the resumed run's)
    timings = json.loads((tmp_path / "cut" / "results.json").read_text())["timings"]
    before = sum(min(end or crashed, crashed) - start for start, end in spent)
    assert 0.5 * before <= timings["quantize, before resuming"] <= before and "quantize" in timings


def test_sigkill_between_block_file_and_commit(make_config, wiki_files, tmp_path):
    """kill -9 after block 1's file is written but before its stream commits: block 1 is redone."""
    full = _config(make_config, wiki_files, tmp_path, "full.yml", GPTQ, tmp_path / "full")
    assert main(["--config", full]) == 0
    cut = _config(make_config, wiki_files, tmp_path, "cut.yml", GPTQ, tmp_path / "cut")
    script = textwrap.dedent(f"""
        import os, signal, sys
        import llmc.engine.checkpoint as ck
        real = ck._atomic_save
        def save(obj, path):
            if path.name.startswith("stage0-stream-0002"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(obj, path)
        ck._atomic_save = save
        from llmc.cli import main
        sys.exit(main(["--config", {cut!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "cut" / ".llmc_resume"
    assert (folder / "stage0-block0001.pt").is_file() and Checkpoint.open(folder, resume=True).finished(0) == 1
    assert main(["--config", cut, "--resume"]) == 0
    _assert_same(tmp_path / "full", tmp_path / "cut")


def test_resume_refuses_a_different_config_or_data(make_config, wiki_files, tmp_path, monkeypatch, capsys):
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(Path(wiki_files["valid"]).read_text())
    cut = _config(make_config, wiki_files, tmp_path, "cut.yml", GPTQ, tmp_path / "cut")
    raw = yaml.safe_load(open(cut))
    raw["calib"]["path"] = str(calib_file)
    Path(cut).write_text(yaml.safe_dump(raw))
    with monkeypatch.context() as m:
        _crash_after(m, 0, 0)
        with pytest.raises(Crash):
            main(["--config", cut])
    capsys.readouterr()

    assert main(["--config", cut, "--resume", "--set", "quant.weight.bit=4"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "quant.weight.bit: 3 then, 4 now" in err

    calib_file.write_text(calib_file.read_text()[::-1])
    assert main(["--config", cut, "--resume"]) == 2
    assert "different calibration data" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(make_config, wiki_files, tmp_path, capsys):
    cfg = _config(make_config, wiki_files, tmp_path, "c.yml", GPTQ, tmp_path / "none")
    assert main(["--config", cfg, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
