"""LLMC's config surface beyond ppl/lm_eval: decode_ppl, token_acc, generate_only, several datasets per
eval section, eval_pos spellings, torch_dtype spellings, need_pack / pack_version. Each evaluation type is
run end to end on a tiny model and checked against a computation written here."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmc.cli import main
from tiny import make_tokenizer

W8_KV2 = {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
          "kvcache": {"method": "Naive", "bit": 2, "symmetric": True, "granularity": "per_token"}}


def _results(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())


def _rows(path, n):
    return open(path).read().splitlines()[:n]


def _decode_ppl(model, rows, cache=None):
    """Token by token through a cache (a fresh one per row), next-token NLL averaged over all tokens."""
    from transformers import DynamicCache

    nlls = []
    tok = make_tokenizer()
    with torch.no_grad():
        for row in rows:
            ids = tok(row, return_tensors="pt").input_ids
            c = cache() if cache else DynamicCache()
            for i in range(ids.shape[1] - 1):
                logits = model(input_ids=ids[:, i:i + 1], cache=c, use_cache=True).logits
                nlls.append(F.cross_entropy(logits[0, -1:], ids[0, i + 1:i + 2]).item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def _full_ppl(model, rows):
    """The same rows in one full-sequence forward each (no cache)."""
    nlls = []
    tok = make_tokenizer()
    with torch.no_grad():
        for row in rows:
            ids = tok(row, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            logits = model(ids, use_cache=False).logits[0, :-1]
            nlls += F.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_decode_ppl_float_equals_full_sequence_and_quantized_kv_equals_a_quantizing_cache(make_config, tmp_path,
                                                                                          wiki_files):
    from test_rtn_cli import KVQuantCache, rtn_reference, rtn_sym_rows

    path = make_config({"quant": W8_KV2, "eval": {"type": "decode_ppl", "num_samples": 4,
                                                  "eval_pos": ["pretrain", "fake_quant", "fake_quant_wo_kv"]}})
    assert main(["--config", path]) == 0
    res = _results(tmp_path)
    got = {e["pos"]: e for e in res["evals"]}
    assert all(e["type"] == "decode_ppl" for e in res["evals"])
    rows = _rows(wiki_files["test"], 4)
    model_path = res["config"]["model"]["path"]
    float_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    full, n = _full_ppl(float_model, rows)
    assert got["pretrain"]["value"] == pytest.approx(full, rel=1e-5) and got["pretrain"]["tokens"] == n
    reference = rtn_reference(model_path, lambda w: rtn_sym_rows(w, 8))
    kv, _ = _decode_ppl(reference, rows, cache=lambda: KVQuantCache(reference.config, 2))
    assert got["fake_quant"]["value"] == pytest.approx(kv, rel=1e-5)
    assert got["fake_quant_wo_kv"]["value"] == pytest.approx(_decode_ppl(reference, rows)[0], rel=1e-5)
    assert abs(kv / got["fake_quant_wo_kv"]["value"] - 1) > 1e-3


def test_decode_ppl_num_eval_tokens_stops_early(make_config, tmp_path):
    path = make_config({"eval": {"type": "decode_ppl", "num_samples": 4, "num_eval_tokens": 7,
                                 "eval_pos": ["pretrain"]}})
    assert main(["--config", path]) == 0
    assert _results(tmp_path)["evals"][0]["tokens"] == 7


def test_token_acc_is_one_against_itself_and_matches_an_independent_count(make_config, tmp_path, wiki_files):
    from llmc.export.save import load_fake_quant
    from test_rtn_cli import _windows

    path = make_config({"eval": {"type": "token_acc", "eval_pos": ["pretrain", "fake_quant"]},
                        "quant": {"weight": {"bit": 2}}, "save": {"save_fake": True}})
    assert main(["--config", path]) == 0
    res = _results(tmp_path)
    got = {e["pos"]: e["value"] for e in res["evals"]}
    assert got["pretrain"] == 1.0
    windows = _windows(wiki_files["test"])  # 4 x 64, as the section reads them
    float_model = AutoModelForCausalLM.from_pretrained(res["config"]["model"]["path"], dtype=torch.float32).eval()
    quant = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    with torch.no_grad():
        expected = (float_model(windows).logits.argmax(-1) == quant(windows).logits.argmax(-1)).float().mean().item()
    assert got["fake_quant"] == pytest.approx(expected, abs=1e-6)
    assert got["fake_quant"] < 1.0


def test_llmc_eval_token_consist_adds_token_acc_on_the_ppl_windows(make_config, tmp_path, capsys):
    """LLMC's `eval_token_consist: True` in a ppl section: PPL and the token agreement on the same windows."""
    path = make_config({"eval": {"eval_token_consist": True, "eval_pos": ["fake_quant"]},
                        "quant": {"weight": {"bit": 2}}}, name="consist.yml")
    assert main(["--config", path]) == 0
    rows = {e.get("type", "ppl"): e.get("value", e.get("ppl")) for e in _results(tmp_path)["evals"]}
    other = make_config({"eval": {"type": "token_acc", "eval_pos": ["fake_quant"]}, "quant": {"weight": {"bit": 2}},
                         "save": {"save_path": str(tmp_path / "other")}}, name="acc.yml")
    assert main(["--config", other]) == 0
    alone = json.loads((tmp_path / "other" / "results.json").read_text())["evals"][0]["value"]
    assert set(rows) == {"ppl", "token_acc"} and rows["token_acc"] == alone < 1.0
    bad = make_config({"eval": {"type": "decode_ppl", "eval_token_consist": True}}, name="bad.yml")
    assert main(["--config", bad, "--dry-run"]) == 2
    assert "eval_token_consist" in capsys.readouterr().err


def test_generate_only_saves_greedy_texts(make_config, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    questions = ["The quick brown fox", "Quantization maps"]
    (folder / "samples.json").write_text(json.dumps([{"question": q} for q in questions]))
    path = make_config({"eval": {"type": "generate_only", "name": "custom_gen", "path": str(folder), "bs": 1,
                                 "max_new_tokens": 5, "eval_pos": ["pretrain"], "seq_len": 2048}})
    assert main(["--config", path]) == 0
    row = _results(tmp_path)["evals"][0]
    model = AutoModelForCausalLM.from_pretrained(_results(tmp_path)["config"]["model"]["path"]).eval()
    tok = make_tokenizer()
    for q, sample in zip(questions, row["samples"]):
        ids = tok(q, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert sample == {"prompt": q, "response": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}


def test_generate_only_chat_template_needs_one(make_config, tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "samples.json").write_text(json.dumps([{"question": "hi"}]))
    path = make_config({"eval": {"type": "generate_only", "name": "custom_gen", "path": str(folder),
                                 "apply_chat_template": True}})
    assert main(["--config", path]) == 2
    assert "apply_chat_template" in capsys.readouterr().err


def test_several_datasets_read_path_per_name(make_config, tmp_path, wiki_files):
    import shutil

    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    shutil.copy(wiki_files["test"], root / "wikitext2" / "wiki.test.raw")
    (root / "ptb").write_text("\n".join(["a decoder block holds attention"] * 200))
    path = make_config({"eval": {"name": ["wikitext2", "ptb"], "path": str(root), "eval_pos": ["pretrain"]}})
    assert main(["--config", path]) == 0
    assert {e["dataset"] for e in _results(tmp_path)["evals"]} == {"wikitext2", "ptb"}


@pytest.mark.parametrize("changes,key,words", [
    ({"eval": {"eval_pos": ["nahh"]}}, "eval.eval_pos", ["nahh"]),
    ({"eval": {"num_eval_tokens": 3}}, "eval.num_eval_tokens", ["decode_ppl"]),
    ({"eval": {"type": "decode_ppl", "name": "c4"}}, "eval.name", ["wikitext2"]),
    ({"model": {"torch_dtype": "torch.float8_e4m3fn"}}, "model.torch_dtype", ["FP8"]),
    ({"quant": {"weight": {"need_pack": True}}}, "quant.weight.need_pack", ["save_vllm"]),
    ({"quant": {"weight": {"pack_version": "gemm_pack"}}}, "quant.weight.pack_version", ["save_autoawq"]),
    ({"quant": {"weight": {"pack_version": "gemv_pack"}}, "save": {"save_autoawq": True}},
     "quant.weight.pack_version", ["gemm_pack"]),
    ({"quant": {"weight": {"clip_ratio": 0.9}}}, "quant.weight.clip_ratio", ["calib_algo: mse"]),
    ({"quant": {"act": {"bit": 8, "granularity": "per_tensor", "static": True, "calib_algo": "percentile",
                        "clip_ratio": 0.9}}, "calib": {"name": "wikitext2", "n_samples": 2, "seq_len": 16}},
     "quant.act.clip_ratio", ["minmax"]),
    ({"quant": {"weight": {"bit": 8, "granularity": "per_channel", "group_size": -1, "symmetric": True},
                "act": {"bit": 8, "granularity": "per_token", "clip_ratio": 0.9}}, "save": {"save_vllm": True}},
     "save.save_vllm", ["clip_ratio 0.9", "static"]),
])
def test_surface_errors_name_the_key(make_config, capsys, changes, key, words):
    assert main(["--config", make_config(changes), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert key in err and all(w in err for w in words)


def test_llmc_spellings_are_read_as_meant(make_config, capsys):
    from llmc.config import load_config

    cfg = load_config(make_config({"eval": {"eval_pos": ["fake-quant"]}, "model": {"torch_dtype": "torch.float32"},
                                   "quant": {"weight": {"need_pack": True}}, "save": {"save_vllm": True}}))
    assert cfg.eval[0].eval_pos == ["fake_quant"] and cfg.model.torch_dtype == "float32"
    assert load_config(make_config({"eval": {"eval_pos": []}})).eval[0].eval_pos == []


def test_opencompass_section_without_opencompass_runs_and_records_the_skip(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    path = make_config({"opencompass": {"cfg_path": "eval_base.py", "max_num_workers": 1, "output_path": "oc"},
                        "eval": {"eval_pos": ["fake_quant"], "num_samples": 1}})
    assert main(["--config", path]) == 0
    assert _results(tmp_path)["opencompass"] == "skipped: opencompass is not installed"


def test_opencompass_installed_needs_save_trans(make_config, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/opencompass")
    path = make_config({"opencompass": {"cfg_path": "eval_base.py"}})
    assert main(["--config", path, "--dry-run"]) == 2
    assert "save_trans" in capsys.readouterr().err


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _chat_model(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_dir(), folder)
    (folder / "chat_template.jinja").write_text(CHAT)
    return str(folder)


def test_custom_txt_chat_template_calibration(make_config, tiny_dir, tmp_path):
    import random

    from llmc.config import load_config
    from llmc.data import load_calib_samples
    from llmc.models.load import load_tokenizer
    from llmc.models import resolve_source
    from llmc.registry import PREPROCESSORS

    data = tmp_path / "custom"
    data.mkdir()
    questions = [f"Question {i}: what does a decoder block hold and why?" for i in range(12)]
    (data / "samples.json").write_text(json.dumps([{"question": q, "answer": "x"} for q in questions]))
    model = _chat_model(tiny_dir, tmp_path)
    calib = {"name": "custom_txt", "path": str(data), "apply_chat_template": True, "n_samples": 3, "seq_len": 16,
             "bs": -1, "preproc": "random_truncate_txt", "seed": 7}
    path = make_config({"model": {"path": model}, "calib": calib, "quant": {"method": "GPTQ"},
                        "eval": {"eval_pos": ["fake_quant"], "num_samples": 1}})
    cfg = load_config(path)
    tok = load_tokenizer(resolve_source(model), "fast")
    samples = load_calib_samples(cfg.calib, tok)
    rows = [tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]
    assert rows[0] == f"<|system|>You are a helpful assistant.\n<|user|>{questions[0]}\n<|assistant|>"
    expected = PREPROCESSORS.get("random_truncate_txt")(rows, tok, 3, 16, random.Random(7))
    assert all(torch.equal(a, b) for a, b in zip(samples, expected)) and len(samples) == 3
    assert main(["--config", path]) == 0  # and a whole GPTQ run calibrates on them
