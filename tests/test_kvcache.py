import json

import pytest
import torch

from llmc.cli import main
from llmc.config.schema import KVCacheCfg
from llmc.models.adapter import adapter_class
from llmc.quant.kvcache import fake_quant_kv, kv_quantized
from tiny import FAMILIES, make_model


def test_per_token_and_per_head_ranges():
    k = torch.zeros(1, 2, 3, 4)
    k[0, 0, :, 0] = torch.tensor([1.0, 2.0, 4.0])   # head 0
    k[0, 1, :, 1] = torch.tensor([0.01, 0.02, 0.04])  # head 1: tiny values
    per_token = fake_quant_kv(k, _args(4), "per_token")
    per_head = fake_quant_kv(k, _args(4), "per_head")
    # per token, head 1 shares head 0's range: its tiny values round to zero; per head they survive
    assert per_token[0, 1, :, 1].abs().max() == 0
    assert torch.allclose(per_head[0, 1, :, 1], k[0, 1, :, 1], rtol=0.1)
    step = k[0, 0, :, 0] / 7.5  # each token's own absmax sets its step (grid -8..7)
    assert torch.all((per_token[0, 0, :, 0] - k[0, 0, :, 0]).abs() <= step)


def _args(bit):
    from llmc.quant.quantizer import QuantArgs

    return QuantArgs(bit=bit, symmetric=True, granularity="per_token")


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quant_is_scoped_and_grows_with_fewer_bits(family):
    model = make_model(family)
    adapter = adapter_class(model.config.model_type, None)(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        errs = {}
        for bit in (8, 3):
            with kv_quantized(model, adapter.attention_modules(), KVCacheCfg(bit=bit, granularity="per_head")):
                errs[bit] = (model(ids).logits - ref).abs().max().item()
        after = model(ids).logits
    assert 0 < errs[8] < errs[3]
    assert torch.equal(after, ref)  # leaving the context restores the model's own attention


def test_fake_quant_with_and_without_kv_through_cli(make_config, tmp_path, wiki_files):
    """fake_quant and fake_quant_wo_kv equal plain transformers' PPL of the RTN W8 model with, and without,
    a cache written here that stores keys (after RoPE) and values on a 2-bit per-token grid."""
    from test_rtn_cli import KVQuantCache, _windows, hf_ppl, rtn_reference, rtn_sym_rows

    path = make_config({
        "quant": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
                  "kvcache": {"method": "Naive", "bit": 2, "symmetric": True, "granularity": "per_token"}},
        "eval": {"eval_pos": ["fake_quant", "fake_quant_wo_kv"]},
    })
    assert main(["--config", path]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    evals = {e["pos"]: e["ppl"] for e in res["evals"]}
    reference = rtn_reference(res["config"]["model"]["path"], lambda w: rtn_sym_rows(w, 8))
    windows = _windows(wiki_files["test"])
    kv = hf_ppl(reference, windows, cache=lambda: KVQuantCache(reference.config, 2))
    assert evals["fake_quant"] == pytest.approx(kv, rel=1e-5)
    assert evals["fake_quant_wo_kv"] == pytest.approx(hf_ppl(reference, windows), rel=1e-5)
    assert abs(kv / evals["fake_quant_wo_kv"] - 1) > 1e-3  # 2-bit keys and values do move the PPL


def test_unknown_kv_method_is_a_config_error(make_config, capsys):
    path = make_config({"quant": {"kvcache": {"method": "Kiwi", "bit": 8}}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "quant.kvcache.method" in err and "Kiwi" in err


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sliding_window_masks_reach_the_quantized_attention(family):
    """Under KV quantization, sliding-window layers keep their windows: the hooked forward equals the model's
    own forward through a cache that stores the same quantized keys and values."""
    from transformers import DynamicCache

    class QuantizingCache(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            q = lambda t: fake_quant_kv(t, _args(4), "per_head")  # noqa: E731
            return super().update(q(k), q(v), layer_idx, *args, **kwargs)

    model = make_model(family)
    adapter = adapter_class(model.config.model_type, None)(model)
    ids = torch.randint(2, model.config.vocab_size, (1, 24))  # three times the tiny sliding window
    with torch.no_grad():
        cached = model(ids, cache=QuantizingCache(config=model.config), use_cache=True).logits
        with kv_quantized(model, adapter.attention_modules(), KVCacheCfg(bit=4, granularity="per_head")):
            hooked = model(ids).logits
    assert torch.allclose(hooked, cached, atol=1e-5)
