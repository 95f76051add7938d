"""eval_pos `packed`: the packed checkpoints a run writes are reloaded by their clients and scored beside the
fake-quant model; a checkpoint that computes something else fails the run."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc.cli import main
from llmc.evaluation import packed
from llmc.export import compressed

EVAL = {"eval": {"eval_pos": ["fake_quant", "packed"]}}


def rows(out):
    return {e["pos"]: e for e in json.loads((Path(out) / "results.json").read_text())["evals"]}


def window_ppl(model, windows):
    """Perplexity written out here: exp of the mean over windows of the mean next-token NLL."""
    nll = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
            nll.append(-logp[torch.arange(w.numel() - 1), w[1:]].mean())
    return math.exp(torch.stack(nll).mean())


@pytest.mark.parametrize("weight", [{}, {"symmetric": True}])
def test_packed_score_equals_fake_quant(make_config, tmp_path, capsys, weight):
    path = make_config({**EVAL, "quant": {"weight": weight}, "save": {"save_vllm": True}})
    assert main(["--config", path]) == 0
    r = rows(tmp_path / "out")
    fake, got = r["fake_quant"]["ppl"], r["packed save_vllm"]["ppl"]
    assert abs(got / fake - 1) < 1e-4, (got, fake)
    assert "packed save_vllm" in capsys.readouterr().out  # the summary table shows the row

    # independently: the folder loaded as a user would, scored by the formula above on the run's windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "out" / "vllm_quant_model"
    tok = AutoTokenizer.from_pretrained(folder)
    import yaml

    from llmc.data import load_eval_text
    from llmc.evaluation.ppl import eval_windows

    cfg = yaml.safe_load(Path(path).read_text())["eval"]
    text = load_eval_text("wikitext2", cfg["path"], False, "eval")
    windows = eval_windows(tok, text, cfg["seq_len"], cfg["num_samples"])
    assert abs(window_ppl(AutoModelForCausalLM.from_pretrained(folder).eval(), windows) / got - 1) < 1e-5


def test_corrupted_packed_checkpoint_fails_the_run(make_config, tmp_path, capsys, monkeypatch):
    writer = compressed.save

    def corrupt(model, tokenizer, path, *args, **kwargs):
        writer(model, tokenizer, path, *args, **kwargs)
        f = Path(path) / "model.safetensors"
        tensors = load_file(str(f))
        key = next(k for k in sorted(tensors) if k.endswith("weight_packed"))
        tensors[key] = torch.bitwise_not(tensors[key])  # every code of one linear flipped
        save_file(tensors, str(f), metadata={"format": "pt"})

    import dataclasses

    from llmc.registry import EXPORTERS

    monkeypatch.setitem(EXPORTERS._entries, "save_vllm", dataclasses.replace(compressed.VLLM, save=corrupt))
    path = make_config({**EVAL, "save": {"save_vllm": True}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    r = rows(tmp_path / "out")  # the results are written before the run fails
    fake, got = r["fake_quant"]["ppl"], r["packed save_vllm"]["ppl"]
    assert "save_vllm" in err and f"{got:.4f}" in err and f"{fake:.4f}" in err, err
    assert abs(got / fake - 1) > packed.TOLERANCE["save_vllm"]


@pytest.mark.parametrize("changes, message", [
    ({"eval": {"eval_pos": ["packed"]}, "save": {"save_vllm": True}}, "add fake_quant"),
    ({**EVAL}, "none is set"),
    ({"eval": {"eval_pos": ["fake_quant", "packed"], "type": "token_acc"}, "save": {"save_vllm": True}}, "type ppl"),
])
def test_refused_before_loading(make_config, capsys, monkeypatch, changes, message):
    import llmc.run

    monkeypatch.setattr(llmc.run, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["--config", make_config(changes)]) == 2
    err = capsys.readouterr().err
    assert "eval.eval_pos" in err and message in err, err


def test_gptq_client_missing_is_refused(make_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMC_GPTQMODEL_PYTHON", str(tmp_path / "no-such-python"))
    assert main(["--config", make_config({**EVAL, "save": {"save_gptq": True}})]) == 2
    assert "no-such-python" in capsys.readouterr().err


@pytest.mark.skipif(not Path(packed.client_python()).exists(), reason="no GPTQModel venv (LLMC_GPTQMODEL_PYTHON)")
def test_gptq_and_awq_scores_through_gptqmodel(make_config, tmp_path):
    path = make_config({**EVAL, "save": {"save_gptq": True, "save_autoawq": True}})
    assert main(["--config", path]) == 0
    r = rows(tmp_path / "out")
    for key in ("save_gptq", "save_autoawq"):
        assert abs(r[f"packed {key}"]["ppl"] / r["fake_quant"]["ppl"] - 1) < packed.TOLERANCE[key]


def test_engine_exports_are_scored_by_their_clients(make_config, tmp_path, capsys):
    """GGUF (transformers' gguf reader) and LightLLM (compressed-tensors) reload to the fake-quant score;
    TensorRT-LLM, which has no client on a CPU machine, is left out with a log line, never scored as passed."""
    path = make_config({**EVAL, "quant": {"weight": {"symmetric": True, "group_size": 32}},
                        "save": {"save_gguf": True, "save_lightllm": True}})
    assert main(["--config", path]) == 0
    r = rows(tmp_path / "out")
    for key in ("save_gguf", "save_lightllm"):
        assert abs(r[f"packed {key}"]["ppl"] / r["fake_quant"]["ppl"] - 1) < 1e-4, key

    path = make_config({**EVAL, "quant": {"weight": {"symmetric": True, "group_size": 64}},
                        "save": {"save_trtllm": True, "save_vllm": True, "save_path": str(tmp_path / "trt")}},
                       name="trt.yml")
    from loguru import logger

    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    try:
        assert main(["--config", path]) == 0
    finally:
        logger.remove(sink)
    r = rows(tmp_path / "trt")
    assert "packed save_vllm" in r and "packed save_trtllm" not in r
    assert any("save_trtllm left out" in m for m in seen)
