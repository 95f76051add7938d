"""model.offload: disk: blocks stream from a sharded safetensors checkpoint, one resident at a time, and
the run's result equals the fully loaded run's bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import llmc.engine.offload as offload
from llmc.cli import main
from tiny import make_model, make_tokenizer

CALIB = {"name": "wikitext2", "n_samples": 8, "seq_len": 32, "bs": 4}
W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}
METHODS = {
    "RTN": {"method": "RTN", "weight": W3},
    "GPTQ": {"method": "GPTQ", "weight": W3, "special": {"actorder": True, "static_groups": True}},
    "Awq": {"method": "Awq", "weight": W3, "quant_out": True},
}


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved as several safetensors shards."""
    path = tmp_path / "sharded"
    model = make_model("llama")
    model.save_pretrained(path, max_shard_size="60KB")
    make_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 3
    return path, max(sum(p.numel() for p in b.parameters()) for b in model.model.layers)


def _config(make_config, wiki_files, tmp_path, name, model_path, quant, offload_mode):
    path = make_config({"model": {"path": str(model_path), "offload": offload_mode},
                        "calib": {**CALIB, "path": wiki_files["valid"]},
                        "eval": {"eval_pos": ["pretrain", "fake_quant"]},
                        "save": {"save_path": str(tmp_path / name), "save_fake": True, "save_trans": True}},
                       name=f"{name}.yml")
    raw = yaml.safe_load(open(path))
    raw["quant"] = quant
    Path(path).write_text(yaml.safe_dump(raw))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_run_equals_loaded_run_with_one_block_resident(make_config, wiki_files, tmp_path, monkeypatch,
                                                                  sharded, method):
    model_path, block_params = sharded
    loaded = _config(make_config, wiki_files, tmp_path, "loaded", model_path, METHODS[method], "none")
    assert main(["--config", loaded]) == 0

    seen: dict = {"blocks": None, "peak": 0}
    real_tag, real_load = offload.tag_blocks, offload.BlockStore.load

    def tag(blocks, names):
        seen["blocks"] = blocks
        real_tag(blocks, names)

    def load(self, module, device):
        out = real_load(self, module, device)
        resident = sum(p.numel() for b in seen["blocks"] for p in b.parameters() if not p.is_meta)
        seen["peak"] = max(seen["peak"], resident)
        return out

    monkeypatch.setattr("llmc.run.tag_blocks", tag)
    monkeypatch.setattr(offload.BlockStore, "load", load)
    streamed = _config(make_config, wiki_files, tmp_path, "streamed", model_path, METHODS[method], "disk")
    assert main(["--config", streamed]) == 0

    assert seen["peak"] == block_params  # at every load exactly one block's weights are in memory
    for folder in ("fake_quant_model", "transformed_model"):
        a, b = _tensors(tmp_path / "loaded" / folder), _tensors(tmp_path / "streamed" / folder)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    ppl = [[e["ppl"] for e in json.loads((tmp_path / n / "results.json").read_text())["evals"]]
           for n in ("loaded", "streamed")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    assert not (tmp_path / "streamed" / offload.FOLDER).exists()


def test_streamed_checkpoint_loads_in_transformers(make_config, wiki_files, tmp_path, sharded):
    from transformers import AutoModelForCausalLM

    model_path, _ = sharded
    cfg = _config(make_config, wiki_files, tmp_path, "streamed", model_path, METHODS["RTN"], "disk")
    assert main(["--config", cfg]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed" / "transformed_model")
    ref = AutoModelForCausalLM.from_pretrained(model_path)
    ids = torch.arange(40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # RTN leaves the float weights unchanged


def test_auto_streams_only_when_the_checkpoint_exceeds_free_ram(sharded, monkeypatch):
    model_path, _ = sharded
    monkeypatch.setattr(offload, "available_ram_bytes", lambda: 1 << 40)
    assert not offload.wants_offload("auto", str(model_path))
    monkeypatch.setattr(offload, "available_ram_bytes", lambda: 1000)
    assert offload.wants_offload("auto", str(model_path))
    assert offload.wants_offload("disk", str(model_path)) and not offload.wants_offload("none", str(model_path))


def test_offload_refuses_what_it_cannot_stream(make_config, wiki_files, tmp_path, sharded, capsys):
    model_path, _ = sharded
    cfg = _config(make_config, wiki_files, tmp_path, "x", model_path, METHODS["RTN"], "disk")
    assert main(["--config", cfg, "--set", "save.save_vllm=True"]) == 2
    assert "model.offload: disk: save_vllm do not stream yet" in capsys.readouterr().err
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((model_path / "config.json").read_text())
    make_tokenizer().save_pretrained(empty)
    cfg = _config(make_config, wiki_files, tmp_path, "y", empty, METHODS["RTN"], "disk")
    assert main(["--config", cfg]) == 2
    assert "needs an HF folder with safetensors weights" in capsys.readouterr().err


def test_streamed_run_resumes_to_the_same_result(make_config, wiki_files, tmp_path, monkeypatch, sharded):
    from test_resume import Crash, _crash_after

    model_path, _ = sharded
    full = _config(make_config, wiki_files, tmp_path, "full", model_path, METHODS["GPTQ"], "disk")
    assert main(["--config", full]) == 0
    cut = _config(make_config, wiki_files, tmp_path, "cut", model_path, METHODS["GPTQ"], "disk")
    with monkeypatch.context() as m:
        _crash_after(m, 0, 1)
        with pytest.raises(Crash):
            main(["--config", cut])
    assert main(["--config", cut, "--resume"]) == 0
    a, b = _tensors(tmp_path / "full" / "fake_quant_model"), _tensors(tmp_path / "cut" / "fake_quant_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
