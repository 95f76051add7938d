"""Auto-tune (llmc/tune.py): every candidate runs on one loaded model, is scored on the held-out slice, and the
lowest score is kept and saved; each candidate's score is recomputed here by running it alone."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmc.cli import main

W = lambda bit, group=32: {"bit": bit, "symmetric": False, "granularity": "per_group", "group_size": group}  # noqa: E731
CANDIDATES = [
    {"method": "RTN", "weight": W(2)},
    {"method": "GPTQ", "weight": W(3)},
    {"method": "RTN", "weight": W(3)},
    {"method": "Awq", "weight": W(3), "special": {"n_grid": 4, "clip_grid": 4, "clip_tokens": 64}},  # small grids: fast
]
HELD_OUT = {"name": "wikitext2", "path": None, "seq_len": 64, "num_samples": 3, "bs": 2}


def tune_changes(wiki_files, DELETE, candidates, **eval_keys):
    return {"quant": DELETE, "eval": {"eval_pos": ["fake_quant"], "num_samples": 3},
            "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
            "tune": {"candidates": candidates, "eval": {**HELD_OUT, "path": wiki_files["test"], **eval_keys}}}


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def test_tune_keeps_the_lowest_and_saves_only_it(make_config, wiki_files, DELETE, tmp_path, capsys):
    path = make_config({**tune_changes(wiki_files, DELETE, CANDIDATES), "save": {"save_fake": True}}, name="tune.yml")
    assert main(["--config", path]) == 0
    table = capsys.readouterr().out
    rows = [e for e in results(tmp_path / "out")["evals"] if e.get("type") == "tune"]
    assert len(rows) == len(CANDIDATES) and all(e["seconds"] > 0 for e in rows)
    assert "tune candidate" in table and all(e["candidate"] in table for e in rows)

    # each candidate alone, scored on the same windows (the held-out slice is windows 0-2 of the test text)
    alone = []
    for i, cand in enumerate(CANDIDATES):
        out = tmp_path / f"alone{i}"
        cfg = make_config({"quant": cand, "eval": {"eval_pos": ["fake_quant"], "num_samples": 3},
                           "calib": tune_changes(wiki_files, DELETE, [])["calib"],
                           "save": {"save_fake": True, "save_path": str(out)}}, name=f"alone{i}.yml")
        assert main(["--config", cfg]) == 0
        alone.append(results(out)["evals"][0]["ppl"])
    assert [e["ppl"] for e in rows] == pytest.approx(alone, rel=1e-6)
    best = min(range(len(alone)), key=alone.__getitem__)
    assert [e["chosen"] for e in rows] == [i == best for i in range(len(rows))]
    assert len(set(alone)) == len(alone)  # the choice is not a tie

    # the run's fake-quant score and saved weights are the winner's
    fake = next(e for e in results(tmp_path / "out")["evals"] if e["pos"] == "fake_quant")
    assert fake["ppl"] == pytest.approx(alone[best], rel=1e-6)
    saved = load_file(str(tmp_path / "out" / "fake_quant_model" / "model.safetensors"))
    winner = load_file(str(tmp_path / f"alone{best}" / "fake_quant_model" / "model.safetensors"))
    assert saved.keys() == winner.keys() and all(torch.equal(saved[k], winner[k]) for k in saved)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fake_quant_model", "results.json", "results.md"]


@pytest.mark.parametrize("groups, expected", [(None, [32]), ([32, 64], [32, 64])])
def test_builtin_list_skips_group_sizes_the_model_cannot_take(make_config, wiki_files, DELETE, capsys, groups, expected):
    """INC's list: RTN/GPTQ/AWQ x group sizes, asymmetric int4. The tiny model's linears are 64 and 128 wide:
    the default g128 does not divide 64, so it is skipped (with a log line); the plan lists what would run."""
    changes = tune_changes(wiki_files, DELETE, "builtin")
    if groups:
        changes["tune"]["group_sizes"] = groups
    assert main(["--config", make_config(changes), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tune candidate")]
    want = [(m, g) for m in ("RTN", "GPTQ", "AWQ") for g in expected]
    assert len(lines) == len(want), lines
    for line, (method, group) in zip(lines, want):
        assert f": {method}: weights int4 asym g{group}" in line, line


def test_held_out_slice_is_the_windows_asked_for(make_config, wiki_files, DELETE):
    from llmc.config import load_config
    from llmc.data import load_eval_text
    from llmc.evaluation.ppl import eval_windows
    from llmc.models.load import load_tokenizer
    from llmc.models import resolve_source
    from llmc import tune

    config = load_config(make_config(tune_changes(wiki_files, DELETE, CANDIDATES, start=2, num_samples=3)))
    tok = load_tokenizer(resolve_source(config.model.path, None), "fast")
    every = eval_windows(tok, load_eval_text("wikitext2", wiki_files["test"], False, "x"), 64, None)
    assert torch.equal(tune.windows(config, tok), every[2:5])


@pytest.mark.parametrize("change, key, words", [
    ({1: {"method": "GPTQ", "weight": W(4, 48)}}, "tune.candidates.1.weight.group_size", "48 does not divide"),
    ({2: {"method": "NoSuchMethod", "weight": W(4)}}, "tune.candidates.2.method", "NoSuchMethod"),
    ({0: {"method": "Quarot", "weight": W(4)}}, "tune.candidates.0.method", "structure"),
    ({3: {"method": "Awq", "weight": W(4), "special": {"save_scale": True, "scale_path": "/tmp/x"}}},
     "tune.candidates.3.special", "save_scale"),
    ({"eval": {"start": 500}}, "tune.eval.start", "windows"),
    ({"bit": 3}, "tune", "builtin candidates"),
    ({"candidates": [{"method": "RTN", "weight": W(4)}]}, "tune", "at least 2"),
])
def test_bad_candidates_refused_before_loading(make_config, wiki_files, DELETE, capsys, monkeypatch, change, key, words):
    import llmc.run

    monkeypatch.setattr(llmc.run, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    changes = tune_changes(wiki_files, DELETE, [dict(c) for c in CANDIDATES])
    for k, v in change.items():
        if isinstance(k, int):
            changes["tune"]["candidates"][k] = v
        elif k == "eval":
            changes["tune"]["eval"].update(v)
        else:
            changes["tune"][k] = v
    assert main(["--config", make_config(changes)]) == 2
    err = capsys.readouterr().err
    assert key in err and words in err, err


def test_tune_with_quant_or_resume_is_refused(make_config, wiki_files, DELETE, capsys):
    changes = tune_changes(wiki_files, DELETE, CANDIDATES)
    changes.pop("quant")
    assert main(["--config", make_config(changes)]) == 2  # the baseline's quant section stays: two choices
    assert "give either quant" in capsys.readouterr().err
    assert main(["--config", make_config(tune_changes(wiki_files, DELETE, CANDIDATES)), "--resume"]) == 2
    assert "not resumable" in capsys.readouterr().err
