"""KIVI KV-cache quantization (`kvcache.method: Kivi`): keys per channel over groups of tokens, values per
token over groups of channels, the recent window float; checked against a KIVI cache written here that
evolves as KIVI's does while decoding."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llmc.cli import main
from llmc.quant.kivi import kivi_attention
from llmc.quant.quantizer import QuantArgs

BITS, G, R = 2, 4, 8
KIVI = {"method": "Kivi", "bit": BITS, "symmetric": True, "granularity": "per_group", "group_size": G,
        "residual_length": R}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}


def q_rows(x, bits=BITS):
    """Symmetric round-to-nearest of each row of the last dimension, step absmax / ((2^b - 1) / 2)."""
    step = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps) / ((2 ** bits - 1) / 2)
    return torch.clamp(torch.round(x / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * step


def q_key_chunk(k, g):
    """k [b, h, n, d], n a multiple of g: every channel over every g consecutive tokens."""
    b, h, n, d = k.shape
    return q_rows(k.reshape(b, h, n // g, g, d).transpose(-1, -2)).transpose(-1, -2).reshape(b, h, n, d)


def q_value_tokens(v, g):
    b, h, n, d = v.shape
    return q_rows(v.reshape(b, h, n, d // g, g)).reshape(b, h, n, d)


class KiviCache(DynamicCache):
    """KIVI's cache, step by step: keys wait in float until R fill a chunk (then quantized, per channel in groups
    of G tokens); values keep the last R float, the oldest leaving the window quantized per token. What a step
    reads: the quantized parts, then the float ones, then the new token. (KIVI compresses after attention;
    compressing before the next step's update is the same, as nothing reads in between.)"""

    def __init__(self, config, r, g):
        super().__init__(config=config)
        self.r, self.g = r, g
        self.kq, self.kf, self.vq, self.vf = {}, {}, {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        i = layer_idx
        if i in self.kf:
            if self.kf[i].shape[2] == self.r:
                self.kq[i] = torch.cat([self.kq[i], q_key_chunk(self.kf[i], self.g)], 2)
                self.kf[i] = self.kf[i][:, :, :0]
            if self.vf[i].shape[2] > self.r:
                self.vq[i] = torch.cat([self.vq[i], q_value_tokens(self.vf[i][:, :, :1], self.g)], 2)
                self.vf[i] = self.vf[i][:, :, 1:]
            self.kf[i] = torch.cat([self.kf[i], key_states], 2)
            self.vf[i] = torch.cat([self.vf[i], value_states], 2)
        else:
            self.kq[i], self.vq[i] = key_states[:, :, :0], value_states[:, :, :0]
            self.kf[i], self.vf[i] = key_states, value_states
        super().update(key_states, value_states, layer_idx, *args, **kwargs)  # keeps the length bookkeeping
        return torch.cat([self.kq[i], self.kf[i]], 2), torch.cat([self.vq[i], self.vf[i]], 2)


def test_key_groups_are_per_channel_value_groups_per_token_and_the_window_is_float():
    """One decode query at position t = 19 (R = 8): keys 0..15 quantized per channel over groups of 4 tokens,
    keys 16..19 float; values 0..10 quantized per token over groups of 4 channels, 11..19 float."""
    torch.manual_seed(0)
    T, d = 20, 8
    k, v, q = torch.randn(1, 1, T, d), torch.randn(1, 1, T, d), torch.randn(1, 1, 1, d)
    k[0, 0, :, 3] *= 50  # an outlier channel: per channel, it does not spoil the other channels' keys
    out, _ = kivi_attention(None, q, k, v, None, QuantArgs(bit=BITS, granularity="per_token"), G, R)
    kview, vview = k.clone(), v.clone()
    for c in range(d):
        for g in range(0, 16, G):
            kview[0, 0, g:g + G, c] = q_rows(k[0, 0, g:g + G, c])
    for j in range(11):
        for g in range(0, d, G):
            vview[0, 0, j, g:g + G] = q_rows(v[0, 0, j, g:g + G])
    ref = F.softmax(q @ kview.transpose(2, 3) / math.sqrt(d), -1) @ vview
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    # the reference's window is the float keys themselves, and its quantized keys do move
    assert not torch.allclose(kview[0, 0, :16], k[0, 0, :16]) and torch.equal(kview[0, 0, 16:], k[0, 0, 16:])
    assert torch.equal(kview[0, 0, :16, 0], q_rows(k[0, 0, :16, 0].reshape(4, G)).reshape(16))  # unaffected by ch. 3
    per_token = q_rows(k[0, 0, :16])  # what per-token keys would give: the outlier flattens channel 0
    assert (per_token[:, 0] - k[0, 0, :16, 0]).abs().mean() > 2 * (kview[0, 0, :16, 0] - k[0, 0, :16, 0]).abs().mean()


def _rows(path, n):
    return [r for r in open(path).read().splitlines() if len(r) > 40][:n]


def test_kivi_decode_ppl_equals_an_independent_kivi_cache_and_the_full_forward_agrees(make_config, tmp_path, wiki_files):
    """decode_ppl (token by token through the cache) equals decoding through the KIVI cache above; the
    fake-quant model saved and reloaded gives the same in one whole-row forward."""
    from llmc.export.save import load_fake_quant
    from test_llmc_surface import _decode_ppl, _full_ppl
    from test_rtn_cli import rtn_reference, rtn_sym_rows

    lines = open(wiki_files["test"]).read().splitlines()
    rows = [lines[2] + lines[3], lines[6] + lines[7]]  # about 25 tokens each
    text = tmp_path / "rows.raw"
    text.write_text("\n".join(rows) + "\n")
    kv = {**KIVI, "group_size": 2, "residual_length": 4}
    path = make_config({"quant": {"weight": W8, "kvcache": kv},
                        "eval": {"type": "decode_ppl", "num_samples": 2, "path": str(text), "eval_pos": ["fake_quant"]},
                        "save": {"save_fake": True}})
    assert main(["--config", path]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())["evals"][0]["value"]
    model_path = json.loads((tmp_path / "out" / "results.json").read_text())["config"]["model"]["path"]
    reference = rtn_reference(model_path, lambda w: rtn_sym_rows(w, 8))
    kivi, n = _decode_ppl(reference, rows, cache=lambda: KiviCache(reference.config, 4, 2))
    assert n > 8 * 4  # long enough for keys and values to leave the window many times
    assert got == pytest.approx(kivi, rel=1e-5)
    assert abs(kivi / _full_ppl(reference, rows)[0] - 1) > 1e-3  # 2-bit KIVI moves the PPL
    reloaded = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert _full_ppl(reloaded, rows)[0] == pytest.approx(kivi, rel=1e-5)


@pytest.mark.parametrize("kv, key, words", [
    ({**KIVI, "residual_length": 6}, "quant.kvcache", ["residual_length 6", "group_size 4"]),
    ({**KIVI, "static": True}, "quant.kvcache", ["static True", "Kivi"]),
    ({**KIVI, "granularity": "per_tensor", "group_size": -1}, "quant.kvcache", ["per_tensor", "Kivi"]),
    ({"method": "Naive", "bit": 8, "residual_length": 16}, "quant.kvcache", ["residual_length 16"]),
    ({"method": "Naive", "bit": 8, "granularity": "per_head", "head_num": 3},
     "quant.kvcache.head_num", ["3", "key/value heads"]),
    ({**KIVI, "group_size": 3, "residual_length": 9}, "quant.kvcache.group_size", ["3", "head dimension"]),
    ({"method": "Naive", "bit": 8, "granularity": "per_tensor", "static": True}, "quant.kvcache.static", ["calib"]),
])
def test_bad_kvcache_keys_are_refused_before_loading(make_config, capsys, monkeypatch, kv, key, words):
    import llmc.run

    monkeypatch.setattr(llmc.run, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["--config", make_config({"quant": {"kvcache": kv}})]) == 2
    err = capsys.readouterr().err
    assert key in err and all(w in err for w in words), err


@pytest.mark.parametrize("name", ["KVQuant/rtn_w_a_kivi_quant_kv", "KVQuant/rtn_w_a_naive_quant_kv",
                                  "KVQuant/rtn_w_a_perhead_static_naive_quant_kv",
                                  "KVQuant/rtn_w_a_pertensor_static_naive_quant_kv", "RTN/rtn_w_a_pertensor_static_hist"])
def test_kv_configs_pass_dry_run(name, tiny_dir, capsys):
    """The shipped equivalents of LLMC's KVQuant configs (and its static_hist RTN config) on the tiny model;
    test_shipped_configs runs them end to end."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "quantization" / "methods" / f"{name}.yml"
    assert main(["--config", str(config), "--dry-run", "--set", f"model.path={tiny_dir('llama')}"]) == 0
    assert "kv cache" in capsys.readouterr().out or "static_hist" in name


@pytest.mark.parametrize("family", ["qwen2", "opt", "phi3"])
def test_full_forward_reads_what_decoding_through_the_cache_reads(family):
    """A forward over the whole sequence gives every position the log-probabilities it gets decoding token by
    token through transformers' cache (KIVI's view is rebuilt from the float cache at every step)."""
    from llmc.config.schema import KVCacheCfg
    from llmc.models.adapter import adapter_class
    from llmc.quant.kvcache import kv_quantized
    from tiny import make_model

    model = make_model(family)
    adapter = adapter_class(model.config.model_type, None)(model)
    ids = torch.randint(2, model.config.vocab_size, (1, 14))
    cfg = KVCacheCfg(method="Kivi", bit=2, granularity="per_group", group_size=4, residual_length=4)
    with torch.no_grad(), kv_quantized(model, adapter.attention_modules(), cfg):
        full = F.log_softmax(model(ids).logits[0], -1)
        cache = DynamicCache(config=model.config)
        steps = torch.cat([model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits[0] for i in range(14)])
    with torch.no_grad():
        plain = F.log_softmax(model(ids).logits[0], -1)
    assert torch.allclose(full, F.log_softmax(steps, -1), atol=1e-4)
    assert (full - plain).abs().max() > 1e-2  # and the 2-bit cache does change them


def test_kivi_decoding_a_sliding_window_family_is_refused(make_config, capsys):
    path = make_config({"quant": {"kvcache": KIVI}, "eval": {"type": "decode_ppl", "eval_pos": ["fake_quant"]}},
                       family="gemma2")
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "quant.kvcache.method" in err and "sliding-window" in err


def test_asymmetric_kivi_groups_span_their_own_min_to_max():
    """symmetric: False is KIVI's grid: 2^b levels from each group's min to its max (no zero point widening)."""
    from llmc.quant.kivi import kivi_keys, kivi_values

    torch.manual_seed(1)
    k = torch.rand(1, 2, 8, 8) + 3.0  # all positive: a grid through 0 would waste most levels
    args = QuantArgs(bit=2, symmetric=False, granularity="per_token")

    def minmax_rows(x):
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = (mx - mn) / 3
        return torch.clamp(torch.round((x - mn) / s), 0, 3) * s + mn

    want_k = minmax_rows(k.reshape(1, 2, 2, 4, 8).transpose(-1, -2)).transpose(-1, -2).reshape(k.shape)
    assert torch.allclose(kivi_keys(k, args, 4), want_k, atol=1e-6)
    assert torch.allclose(kivi_values(k, args, 4), minmax_rows(k.reshape(1, 2, 8, 2, 4)).reshape(k.shape), atol=1e-6)
    assert (kivi_keys(k, args, 4) - k).abs().max() <= 1.0 / 6 + 1e-6  # half a step of a range below 1
