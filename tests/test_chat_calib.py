"""Chat calibration data (LLMC's `name: ultrachat`, `preproc: ultrachat_general`) and `calib.padding`
(varying-length samples batched without pad tokens), checked against tokenizations written here."""
from __future__ import annotations

import copy
import json
import random

import datasets
import pytest
import torch
from safetensors.torch import load_file

from llmc.cli import main
from llmc.data import batch_samples, load_calib_samples
from llmc.errors import ConfigError
from llmc.registry import DATASETS, PREPROCESSORS
from tests.test_data import cfg
from tests.test_llmc_surface import CHAT, _chat_model
from tests.tiny import make_tokenizer

WORDS = "the model reads a block of text and the quantizer keeps its output close".split()


def conversations(n: int = 10) -> list[list[dict]]:
    """Conversations of different lengths (conversation i has i + 1 words per turn)."""
    return [[{"role": "user", "content": f"{i}: " + " ".join(WORDS[:1 + i % len(WORDS)])},
             {"role": "assistant", "content": " ".join(reversed(WORDS[:2 + i % 5]))}] for i in range(n)]


@pytest.fixture
def chat_tok():
    tok = copy.deepcopy(make_tokenizer())  # make_tokenizer's object is shared by the session
    tok.chat_template = CHAT
    return tok


def _write_jsonl(path, convs):
    path.write_text("\n".join(json.dumps({"prompt": c[0]["content"], "messages": c}) for c in convs) + "\n")
    return str(path)


def test_ultrachat_rows_from_jsonl_and_saved_dataset(tmp_path):
    convs = conversations()
    source = DATASETS.get("ultrachat")
    assert source(_write_jsonl(tmp_path / "chat.jsonl", convs), False, "calib") == convs
    ds = datasets.Dataset.from_dict({"prompt": [c[0]["content"] for c in convs], "messages": convs})
    datasets.DatasetDict({"train_sft": ds, "test_sft": ds.select([0])}).save_to_disk(tmp_path / "saved")
    assert source(str(tmp_path / "saved"), False, "calib") == convs
    with pytest.raises(ConfigError, match=r"eval\.name"):
        source(str(tmp_path / "saved"), False, "eval")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"calib\.path.*bad\.jsonl.*needs 'messages'"):
        source(str(tmp_path / "bad.jsonl"), False, "calib")


def test_ultrachat_general_is_each_conversation_through_the_template_cut_at_seq_len(tmp_path, chat_tok):
    convs = conversations(12)
    path = _write_jsonl(tmp_path / "chat.jsonl", convs)
    samples = load_calib_samples(cfg(name="ultrachat", path=path, n_samples=5, seq_len=40, seed=3), chat_tok)
    # Written out here: "<|role|>content\n" per turn, tokenized without added special tokens.
    texts = ["".join(f"<|{m['role']}|>{m['content']}\n" for m in c) for c in convs]
    whole = [chat_tok(t, add_special_tokens=False, return_tensors="pt").input_ids for t in texts]
    assert len(samples) == 5
    picked = []
    for s in samples:
        match = [i for i, w in enumerate(whole) if torch.equal(s, w[:, :40])]
        assert match, "every sample is one conversation's template text, cut at seq_len"
        picked.append(match[0])
    assert len(set(picked)) == 5
    assert len({s.shape[1] for s in samples}) > 1  # lengths differ: this is why LLMC pads
    again = load_calib_samples(cfg(name="ultrachat", path=path, n_samples=5, seq_len=40, seed=3), chat_tok)
    assert all(torch.equal(a, b) for a, b in zip(samples, again))
    other = load_calib_samples(cfg(name="ultrachat", path=path, n_samples=5, seq_len=40, seed=4), chat_tok)
    assert not all(torch.equal(a, b) for a, b in zip(samples, other))


def test_ultrachat_general_needs_a_chat_template(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", conversations(3))
    with pytest.raises(Exception, match="chat template"):
        PREPROCESSORS.get("ultrachat_general")(DATASETS.get("ultrachat")(path, False, "calib"), make_tokenizer(),
                                               2, 16, random.Random(0))


def test_padding_batches_each_length_apart_and_keeps_every_sample():
    lengths = [5, 3, 5, 7, 3, 5]
    samples = [torch.arange(n).reshape(1, -1) + 10 * i for i, n in enumerate(lengths)]
    with pytest.raises(ConfigError, match="padding: True"):
        batch_samples(samples, -1)
    batches = batch_samples(samples, -1, padding=True)
    assert [b.shape for b in batches] == [(2, 3), (3, 5), (1, 7)]
    rows = sorted(tuple(r.tolist()) for b in batches for r in b)
    assert rows == sorted(tuple(s[0].tolist()) for s in samples)  # no pads, nothing lost or repeated
    # bs chunks first (as without padding), then each chunk by length
    assert [b.shape for b in batch_samples(samples, 3, padding=True)] == [(1, 3), (2, 5), (1, 3), (1, 5), (1, 7)]


def test_llmc_chat_config_runs_and_padding_equals_one_sample_per_batch(make_config, tiny_dir, tmp_path):
    """LLMC's awq_w_a_chat_data calib section (ultrachat, padding, bs -1) runs GPTQ end to end; its result
    equals calibrating one sample per batch (bs: 1), i.e. no pad token entered the Hessians."""
    model = _chat_model(tiny_dir, tmp_path)
    data = _write_jsonl(tmp_path / "chat.jsonl", conversations(16))
    weights = {}
    for mode, calib in {"padded": {"padding": True, "bs": -1}, "one": {"bs": 1}}.items():
        out = tmp_path / mode
        path = make_config({"model": {"path": model}, "quant": {"method": "GPTQ"},
                            "calib": {"name": "ultrachat", "path": data, "preproc": "ultrachat_general",
                                      "n_samples": 8, "seq_len": 24, "seed": 1, **calib},
                            "eval": {"eval_pos": []}, "save": {"save_fake": True, "save_path": str(out)}},
                           name=f"{mode}.yml")
        assert main(["--config", path]) == 0
        weights[mode] = load_file(str(out / "fake_quant_model" / "model.safetensors"))
    for name, w in weights["padded"].items():
        other = weights["one"][name]
        # Same samples, same tokens: only the order of float sums differs (same-length samples share a matmul).
        assert (w == other).float().mean() > 0.99, name
        assert torch.allclose(w, other, atol=0.2 * w.abs().max().item() / 7), name


@pytest.mark.parametrize("calib,key", [
    ({"name": "ultrachat", "preproc": "ultrachat_general", "bs": -1}, "calib.padding"),
    ({"name": "ultrachat", "preproc": "wikitext2_gptq", "padding": True}, "calib.preproc"),
    ({"name": "wikitext2", "apply_chat_template": True}, "calib.apply_chat_template"),
])
def test_chat_calibration_errors_name_the_key(make_config, tmp_path, capsys, calib, key):
    data = _write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    path = make_config({"quant": {"method": "GPTQ"}, "calib": {"path": data, "n_samples": 2, "seq_len": 16, **calib}})
    assert main(["--config", path, "--dry-run"]) == 2
    assert key in capsys.readouterr().err


def test_llmc_padded_custom_data_is_one_sample_per_question(make_config, tiny_dir, tmp_path):
    """LLMC's awq_w_only_custom_data_padding calib section: custom_txt, chat template, padding, bs -1, no
    preproc: each question (in file order) is one whole sample; AWQ runs on them end to end."""
    from llmc.config import load_config
    from llmc.models import resolve_source
    from llmc.models.load import load_tokenizer

    data = tmp_path / "custom"
    data.mkdir()
    questions = [f"{i}: " + " ".join(WORDS[:2 + i]) for i in range(10)]
    (data / "samples.json").write_text(json.dumps([{"question": q} for q in questions]))
    model = _chat_model(tiny_dir, tmp_path)
    calib = {"name": "custom_txt", "download": False, "path": str(data), "apply_chat_template": True,
             "n_samples": 8, "bs": -1, "padding": True, "seed": 42}
    path = make_config({"model": {"path": model}, "calib": calib, "eval": {"eval_pos": []},
                        "quant": {"method": "Awq", "weight": {"bit": 4, "symmetric": False,
                                                              "granularity": "per_group", "group_size": 32}}})
    tok = load_tokenizer(resolve_source(model), "fast")
    samples = load_calib_samples(load_config(path).calib, tok)
    texts = [f"<|system|>You are a helpful assistant.\n<|user|>{q}\n<|assistant|>" for q in questions[:8]]
    assert [s.tolist() for s in samples] == [tok(t, return_tensors="pt").input_ids.tolist() for t in texts]
    assert main(["--config", path]) == 0
