"""RTN end to end through the CLI on a tiny model: results written, saved models reload to the same PPL,
and the reported PPLs equal a perplexity computed here with plain transformers on the same windows, of the
original model and of one rounded to nearest by the formula written here."""
import json
import math
import resource

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from llmc.cli import main
from llmc.data import load_eval_text
from llmc.engine.context import RunContext
from llmc.evaluation.ppl import eval_windows, perplexity
from llmc.export.save import load_fake_quant
from llmc.models.adapter import adapter_class
from llmc.quant.fake_linear import QuantLinear
from tiny import make_tokenizer


def _windows(wiki_test, seq_len=64, n=4):
    return eval_windows(make_tokenizer(), load_eval_text("wikitext2", wiki_test, False), seq_len, n)


def _ppl(model, wiki_test, seq_len=64, n=4, bs=2):
    adapter = adapter_class(model.config.model_type, None)(model)
    return perplexity(model, adapter, _windows(wiki_test, seq_len, n), bs, RunContext(), per_block=False)


# ---- independent references -------------------------------------------------------------------------
def hf_ppl(model, windows, cache=None) -> float:
    """exp(mean over windows of transformers' own mean next-token loss); `cache` makes a fresh Cache per
    window (a quantizing one stands for KV-cache quantization)."""
    losses = []
    with torch.no_grad():
        for w in windows:
            kwargs = {"cache": cache(), "use_cache": True} if cache else {"use_cache": False}
            losses.append(model(w[None], labels=w[None], **kwargs).loss.item())
    return math.exp(sum(losses) / len(losses))


def rtn_asym(w, bits, group):
    """Asymmetric round-to-nearest per group: codes 0..2^b-1, range widened to include 0."""
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, 2 ** bits - 1) - zero) * scale).reshape(w.shape)


def rtn_sym_rows(w, bits):
    """Symmetric per output channel on the signed grid, step absmax / ((2^b - 1) / 2)."""
    step = w.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2)
    return torch.clamp(torch.round(w / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * step


def blocks_of(model):
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


def rtn_reference(path, quantize=lambda w: rtn_asym(w, 4, 32)):
    """The checkpoint at `path` with every linear of every decoder block replaced by quantize(weight)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for block in blocks_of(model):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(quantize(m.weight))
    return model


class KVQuantCache(DynamicCache):
    """A cache that stores keys (after RoPE) and values fake-quantized, symmetric per token over all heads:
    what attention then reads is what a quantized KV cache would hold."""

    def __init__(self, config, bits):
        super().__init__(config=config)
        self.bits = bits

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(self._q(key_states), self._q(value_states), layer_idx, *args, **kwargs)

    def _q(self, t):
        b, h, s, d = t.shape
        rows = t.transpose(1, 2).reshape(b, s, h * d)
        return rtn_sym_rows(rows.reshape(-1, h * d), self.bits).reshape(b, s, h, d).transpose(1, 2)


def _results(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rtn_weight_only_end_to_end(make_config, tmp_path, wiki_files, family, capsys):
    path = make_config({"save": {"save_fake": True, "save_trans": True}}, family=family)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert main(["--config", path]) == 0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = _results(tmp_path)
    by_pos = {e["pos"]: e for e in res["evals"]}
    assert set(by_pos) == {"pretrain", "fake_quant"}
    assert by_pos["fake_quant"]["windows"] == 4 and by_pos["fake_quant"]["seq_len"] == 64
    # the reported PPLs are those of the original model and of RTN W4 g32 as written here
    windows, model_path = _windows(wiki_files["test"]), res["config"]["model"]["path"]
    original = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert by_pos["pretrain"]["ppl"] == pytest.approx(hf_ppl(original, windows), rel=1e-5)
    assert by_pos["fake_quant"]["ppl"] == pytest.approx(hf_ppl(rtn_reference(model_path), windows), rel=1e-5)
    assert rss_before <= res["peak_rss_mb"] <= rss_after and "quantize" in res["timings"]  # MB, this process
    assert res["config"]["quant"]["weight"]["bit"] == 4
    assert "fake_quant" in capsys.readouterr().out  # the summary table

    fake = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert not any(isinstance(m, QuantLinear) for m in fake.modules())  # weight-only: plain linears
    assert _ppl(fake, wiki_files["test"]) == pytest.approx(by_pos["fake_quant"]["ppl"], rel=1e-5)
    trans = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transformed_model")
    assert _ppl(trans, wiki_files["test"]) == pytest.approx(by_pos["pretrain"]["ppl"], rel=1e-5)
    # the saved weights are RTN's: every linear of every block as the formula above gives it
    reference = rtn_reference(model_path)
    for ref_block, block in zip(blocks_of(reference), blocks_of(fake)):
        for (name, m), (_, r) in zip(block.named_modules(), ref_block.named_modules()):
            if isinstance(m, torch.nn.Linear):
                torch.testing.assert_close(m.weight, r.weight, rtol=0, atol=1e-7, msg=name)


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
    # the same PPL from plain transformers: weights RTN W8 per channel, each linear's input rounded to
    # 4 bits with the static step it reloaded (clamped to the grid's ends)
    model_path = res["config"]["model"]["path"]
    reference = rtn_reference(model_path, lambda w: rtn_sym_rows(w, 8))
    steps = {n: m.act_quant.scale.reshape(()) for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    for name, m in reference.named_modules():
        if name in steps:
            m.register_forward_pre_hook(lambda m, a, step=steps[name]: torch.clamp(torch.round(a[0] / step), -8, 7) * step)
    assert len(steps) == 21
    assert fq["ppl"] == pytest.approx(hf_ppl(reference, _windows(wiki_files["test"])), rel=1e-5)


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
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model")
    orig = AutoModelForCausalLM.from_pretrained(json.loads((tmp_path / "out" / "results.json").read_text())
                                                ["config"]["model"]["path"])
    for i in range(3):
        same = torch.equal(fake.model.layers[i].mlp.down_proj.weight, orig.model.layers[i].mlp.down_proj.weight)
        assert same == (i < 2)
    assert not torch.equal(fake.model.layers[0].mlp.up_proj.weight, orig.model.layers[0].mlp.up_proj.weight)
