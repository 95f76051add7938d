"""RTN end to end through the CLI on a tiny model: results written, saved models reload to the same PPL."""
import json
import math

import pytest
import torch

from llmc.cli import main
from llmc.data import load_eval_text
from llmc.engine.context import RunContext
from llmc.evaluation.ppl import eval_windows, perplexity
from llmc.export.save import load_fake_quant
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear
from tiny import make_tokenizer


def _ppl(model, wiki_test, seq_len=64, n=4, bs=2):
    windows = eval_windows(make_tokenizer(), load_eval_text("wikitext2", wiki_test, False), seq_len, n)
    adapter = adapter_class(model.config.model_type, None)(model)
    return perplexity(model, adapter, windows, bs, RunContext(), per_block=False)


def _results(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rtn_weight_only_end_to_end(make_config, tmp_path, wiki_files, family, capsys):
    path = make_config({"save": {"save_fake": True, "save_trans": True}}, family=family)
    assert main(["--config", path]) == 0
    res = _results(tmp_path)
    by_pos = {e["pos"]: e for e in res["evals"]}
    assert set(by_pos) == {"pretrain", "fake_quant"}
    assert by_pos["fake_quant"]["windows"] == 4 and by_pos["fake_quant"]["seq_len"] == 64
    assert by_pos["fake_quant"]["ppl"] != by_pos["pretrain"]["ppl"]
    assert res["peak_rss_mb"] > 0 and "quantize" in res["timings"]
    assert res["config"]["quant"]["weight"]["bit"] == 4
    assert "fake_quant" in capsys.readouterr().out  # the summary table

    fake = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert not any(isinstance(m, QuantLinear) for m in fake.modules())  # weight-only: plain linears
    assert _ppl(fake, wiki_files["test"]) == pytest.approx(by_pos["fake_quant"]["ppl"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    trans = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transformed_model")
    assert _ppl(trans, wiki_files["test"]) == pytest.approx(by_pos["pretrain"]["ppl"], rel=1e-5)
    # the saved weights lie on a 4-bit grid: at most 16 distinct values per group of 32
    w = fake.get_submodule(adapter_class(fake.config.model_type, None).blocks)[0]
    w = dict(w.named_modules())[adapter_class(fake.config.model_type, None).subsets[0].layers[0]].weight
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 32)) <= 16


def test_rtn_w8a8_static_reload_keeps_activation_quant(make_config, tmp_path, wiki_files):
    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2},
        "quant": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                  "act": {"bit": 4, "symmetric": True, "granularity": "per_tensor", "static": True}},
        "save": {"save_fake": True},
    })
    assert main(["--config", path]) == 0
    res = _results(tmp_path)
    fq = next(e for e in res["evals"] if e["pos"] == "fake_quant")
    reloaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    acts = [m.act_quant for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert acts and all(a.args.static and a.scale is not None for a in acts)
    assert _ppl(reloaded, wiki_files["test"]) == pytest.approx(fq["ppl"], rel=1e-5)
    for a in acts:  # without activation quantization the PPL differs: the quantizers matter
        a.args = a.args.__class__(**{**a.args.__dict__, "bit": 8})
    assert not math.isclose(_ppl(reloaded, wiki_files["test"]), fq["ppl"], rel_tol=1e-4)


def test_inference_per_block_matches_full_eval(make_config, tmp_path):
    path = make_config({"eval": {"inference_per_block": True, "eval_pos": ["pretrain", "transformed", "fake_quant"]},
                        "save": {"save_path": str(tmp_path / "a")}})
    assert main(["--config", path, "--results", str(tmp_path / "a.json")]) == 0
    path = make_config({"save": {"save_path": str(tmp_path / "b")}}, name="b.yml")
    assert main(["--config", path, "--results", str(tmp_path / "b.json")]) == 0
    a = {e["pos"]: e["ppl"] for e in json.loads((tmp_path / "a.json").read_text())["evals"]}
    b = {e["pos"]: e["ppl"] for e in json.loads((tmp_path / "b.json").read_text())["evals"]}
    assert a["pretrain"] == pytest.approx(b["pretrain"], rel=1e-5)
    assert a["fake_quant"] == pytest.approx(b["fake_quant"], rel=1e-5)
    assert a["transformed"] == pytest.approx(a["pretrain"], rel=1e-6)  # RTN transforms nothing


def test_ignored_layers_stay_float(make_config, tmp_path):
    path = make_config({"ignored_layers": {"block_ids": ["0-1"], "layer_names": ["mlp.down_proj"]},
                        "save": {"save_fake": True}})
    assert main(["--config", path]) == 0
    from transformers import AutoModelForCausalLM

    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model")
    orig = AutoModelForCausalLM.from_pretrained(json.loads((tmp_path / "out" / "results.json").read_text())
                                                ["config"]["model"]["path"])
    for i in range(3):
        same = torch.equal(fake.model.layers[i].mlp.down_proj.weight, orig.model.layers[i].mlp.down_proj.weight)
        assert same == (i < 2)
    assert not torch.equal(fake.model.layers[0].mlp.up_proj.weight, orig.model.layers[0].mlp.up_proj.weight)
