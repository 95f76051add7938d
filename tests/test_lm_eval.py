"""lm-eval tasks on the in-memory model through the CLI: a local multiple-choice task written here (no hub),
evaluated at pretrain and fake_quant; the pretrain numbers equal lm-eval's own on the same checkpoint."""
import json
import math

import pytest
import yaml

from llmc.cli import main

pytest.importorskip("lm_eval")

TASK = "llmc_tiny_mc"
ROLLING = "llmc_tiny_rolling"  # a continuous score: equal only if the very same logits were scored
DOCS = [
    ("The quick brown fox jumps over the", ["lazy dog.", "small grid.", "feed forward.", "one block."], 0),
    ("Quantization maps floating point weights to a", ["lazy dog.", "small grid.", "time.", "actor."], 1),
    ("A decoder block holds attention and a", ["theatre actor.", "lazy dog.", "feed forward network.", "grid."], 2),
    ("Perplexity is the exponential of the mean", ["fox.", "block.", "weights.", "negative log likelihood."], 3),
    ("Calibration text flows through the model one", ["block at a time.", "lazy dog.", "actor.", "grid."], 0),
    ("Robert Boulter is an English film, television and", ["fox.", "theatre actor.", "weights.", "block."], 1),
] * 2


def write_task(tmp_path) -> str:
    """A task folder for include_path: the YAML and the jsonl it reads (json builder, local file)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in DOCS))
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    (folder / "tiny_rolling.yaml").write_text(yaml.safe_dump({
        "task": ROLLING, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "{{question}} {{choices[label]}}", "metric_list": [{"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0}}))
    return str(folder)


def lm_eval_section(folder, /, **changes):
    return {"type": "lm_eval", "eval_pos": ["pretrain", "fake_quant"], "tasks": [TASK], "include_path": folder,
            "num_fewshot": 0, "batch_size": 4} | changes


def test_lm_eval_on_the_in_memory_model(make_config, tmp_path, wiki_files, tiny_dir, capsys):
    include = write_task(tmp_path)
    ppl = {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2", "path": wiki_files["test"], "seq_len": 64,
           "bs": 2, "num_samples": 2}
    path = make_config({"eval": [ppl, lm_eval_section(include, tasks=[TASK, ROLLING])]})
    assert main(["--config", path]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    got = {(e["pos"], e["metric"]): e for e in res["evals"] if e.get("type") == "lm_eval"}
    metrics = ("acc", "acc_norm", "bits_per_byte")
    assert set(got) == {(p, m) for p in ("pretrain", "fake_quant") for m in metrics}
    for (_, metric), e in got.items():
        assert e["task"] == (ROLLING if metric == "bits_per_byte" else TASK) and e["samples"] == len(DOCS)
        assert math.isfinite(e["value"]) and 0 <= e["value"] <= (1 if metric != "bits_per_byte" else 100)
    assert {e["pos"] for e in res["evals"] if "ppl" in e} == {"pretrain", "fake_quant"}  # PPL rows unchanged
    out = capsys.readouterr().out
    assert "acc_norm" in out and "windows x seq_len" in out  # both tables in the summary
    assert "acc_norm" in (tmp_path / "out" / "results.md").read_text()

    # lm-eval alone on the checkpoint, and on it rounded to nearest by test_rtn_cli's formula (RTN W4 g32):
    # llmc scored the float model at pretrain and the quantized one at fake_quant
    from test_rtn_cli import rtn_reference
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    for pos, model in (("pretrain", original), ("fake_quant", rtn_reference(tiny_dir("llama")))):
        direct = direct_lm_eval(model, tiny_dir("llama"), include, [TASK, ROLLING])
        for metric in metrics:
            expected = direct["results"][ROLLING if metric == "bits_per_byte" else TASK][f"{metric},none"]
            assert got[(pos, metric)]["value"] == pytest.approx(expected, rel=1e-6, abs=1e-9), (pos, metric)
    assert got[("fake_quant", "bits_per_byte")]["value"] != pytest.approx(got[("pretrain", "bits_per_byte")]["value"],
                                                                          rel=1e-4)  # the two are told apart


def direct_lm_eval(model, tokenizer_path, include, tasks, **kwargs):
    """lm-eval's own scoring of an in-memory transformers model on the local tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_path), batch_size=4)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, log_samples=False,
                                   task_manager=TaskManager(include_path=include, include_defaults=False), **kwargs)


@pytest.mark.parametrize("changes, words", [
    ({"tasks": ["no_such_task"]}, ["eval.tasks", "no_such_task", TASK]),
    ({"tasks": []}, ["eval.tasks", "required"]),
    ({"include_path": "/nonexistent/tasks"}, ["eval.include_path", "/nonexistent/tasks"]),
    ({"inference_per_block": True}, ["eval.inference_per_block"]),
    ({"type": "ppl"}, ["eval.tasks", TASK, "type: lm_eval"]),
])
def test_lm_eval_config_errors(make_config, tmp_path, capsys, monkeypatch, changes, words):
    import llmc.run

    monkeypatch.setattr(llmc.run, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    section = lm_eval_section(write_task(tmp_path), **changes)
    from llmc.evaluation import lm_eval as mod

    local = mod.task_manager  # an unknown name would also search lm-eval's built-in index (~10 s): skip it
    monkeypatch.setattr(mod, "task_manager", lambda include_path, defaults: local(include_path, False))
    assert main(["--config", make_config({"eval": section})]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_llmc_spelling_names_tasks(make_config, tmp_path):
    """LLMC lists what to evaluate under `name`; with type lm_eval those are the tasks."""
    from llmc.config import load_config

    section = {k: v for k, v in lm_eval_section(write_task(tmp_path)).items() if k != "tasks"}
    cfg = load_config(make_config({"eval": {**section, "type": "lm-eval", "name": TASK}}))
    assert cfg.eval[0].type == "lm_eval" and cfg.eval[0].tasks == [TASK]


def test_missing_package_named(make_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    assert main(["--config", make_config({"eval": lm_eval_section(str(tmp_path))})]) == 2
    err = capsys.readouterr().err
    assert "eval.type" in err and "lm-eval" in err and "llmc[eval]" in err


def test_kv_cache_quantization_reaches_lm_eval(make_config, tmp_path, tiny_dir):
    """fake_quant scores with the KV-cache quantizers on, fake_quant_wo_kv without: lm-eval alone on the RTN
    model gives the same numbers with test_rtn_cli's quantizing cache, and without it."""
    from test_rtn_cli import KVQuantCache, rtn_reference

    include = write_task(tmp_path)
    section = lm_eval_section(include, tasks=[ROLLING], eval_pos=["fake_quant", "fake_quant_wo_kv"], limit=4)
    path = make_config({"eval": section, "quant": {"kvcache": {"bit": 2, "granularity": "per_token"}}})
    assert main(["--config", path]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    bpb = {e["pos"]: e["value"] for e in res["evals"]}
    assert set(bpb) == {"fake_quant", "fake_quant_wo_kv"}

    model = rtn_reference(tiny_dir("llama"))
    plain = model.forward
    expected = {"fake_quant_wo_kv": direct_lm_eval(model, tiny_dir("llama"), include, [ROLLING], limit=4)}
    model.forward = lambda *a, **k: plain(*a, **{**k, "cache": KVQuantCache(model.config, 2), "use_cache": True})
    expected["fake_quant"] = direct_lm_eval(model, tiny_dir("llama"), include, [ROLLING], limit=4)
    for pos, direct in expected.items():
        assert bpb[pos] == pytest.approx(direct["results"][ROLLING]["bits_per_byte,none"], rel=1e-6), pos
    assert bpb["fake_quant"] != pytest.approx(bpb["fake_quant_wo_kv"], rel=1e-4)  # the two are told apart
