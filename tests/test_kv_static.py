"""Static KV-cache quantization (LLMC's static Naive KV: per_tensor and per_head ranges calibrated on the
calibration set), its save_fake record, and the LightLLM calibration file; checked against a calibration
written here from transformers' own cache."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache

from llmc.cli import main

BITS = 4
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}


def _calib(wiki_files):
    return {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2, "seed": 0}


def independent_ranges(model, samples, per_head):
    """Per layer, for keys and values: each sample's min and max (over the tensor, or per head), averaged over
    the samples; keys as transformers' cache stores them (after RoPE)."""
    stats = {}
    with torch.no_grad():
        for ids in samples:
            cache = DynamicCache()
            model(ids, cache=cache, use_cache=True)
            for i, layer in enumerate(cache.layers):
                for name, t in (("k", layer.keys), ("v", layer.values)):
                    x = t[0].transpose(0, 1).reshape(t.shape[2], -1) if not per_head else t[0].reshape(t.shape[1], -1)
                    mn, mx = (x.min(), x.max()) if not per_head else (x.amin(1), x.amax(1))
                    stats.setdefault((i, name), []).append((mn, mx))
    out = {}
    for key, pairs in stats.items():
        mn = torch.stack([p[0] for p in pairs]).mean(0)
        mx = torch.stack([p[1] for p in pairs]).mean(0)
        out[key] = torch.maximum(mn.abs(), mx.abs())  # absmax of the averaged range
    return out


class StaticKVCache(DynamicCache):
    """Stores keys and values on fixed symmetric grids: step = absmax / ((2^b - 1) / 2), per layer or per head."""

    def __init__(self, config, absmax, per_head):
        super().__init__(config=config)
        self.absmax, self.per_head = absmax, per_head

    def update(self, k, v, layer_idx, *args, **kwargs):
        return super().update(self._q(k, layer_idx, "k"), self._q(v, layer_idx, "v"), layer_idx, *args, **kwargs)

    def _q(self, t, i, name):
        step = self.absmax[(i, name)] / ((2 ** BITS - 1) / 2)
        step = step.reshape(1, -1, 1, 1) if self.per_head else step
        return torch.clamp(torch.round(t / step), -2 ** (BITS - 1), 2 ** (BITS - 1) - 1) * step


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
def test_static_kv_ranges_equal_an_independent_calibration_and_reload(make_config, tmp_path, wiki_files, granularity):
    from llmc.config.schema import CalibCfg
    from llmc.data import load_calib_samples
    from llmc.export.save import load_fake_quant
    from test_rtn_cli import _ppl, _windows, hf_ppl
    from tiny import make_tokenizer

    per_head = granularity == "per_head"
    kv = {"method": "Naive", "bit": BITS, "symmetric": True, "granularity": granularity, "static": True}
    if per_head:
        kv["head_num"] = 2
    path = make_config({"quant": {"weight": W8, "kvcache": kv}, "calib": _calib(wiki_files),
                        "eval": {"eval_pos": ["fake_quant", "fake_quant_wo_kv"]},
                        "save": {"save_fake": True, "save_lightllm_kv_calib": True,
                                 "lightllm_kv_cache_name": "kv.json"}})
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    evals = {e["pos"]: e["ppl"] for e in json.loads((out / "results.json").read_text())["evals"]}
    # the calibration sees the model as evaluated: weights on their grid (what save_fake stored), no KV quant
    reference = AutoModelForCausalLM.from_pretrained(out / "fake_quant_model", dtype=torch.float32).eval()
    samples = load_calib_samples(CalibCfg(**_calib(wiki_files)), make_tokenizer())
    absmax = independent_ranges(reference, samples, per_head)
    saved = load_file(str(out / "fake_quant_model" / "llmc_act_scales.safetensors"))
    lightllm = json.loads((out / "kv.json").read_text())
    assert lightllm["quant_type"] == granularity and lightllm["num_layers"] == 3 and lightllm["num_head"] == 2
    assert lightllm["scales_shape"] == [3, 4 if per_head else 2] and lightllm["qmax"] == 448.0
    for i in range(3):
        for j, name in enumerate("kv"):
            want = absmax[(i, name)].reshape(-1)
            got = saved[f"model.layers.{i}.self_attn.{name}_scale"].reshape(-1) * ((2 ** BITS - 1) / 2)
            assert torch.allclose(got, want, rtol=1e-5)
            n = want.numel()
            row = torch.tensor(lightllm["scales"][i][j * n:(j + 1) * n])
            assert torch.allclose(row, want / 448.0, rtol=1e-5)
    windows = _windows(wiki_files["test"])
    expect = hf_ppl(reference, windows, cache=lambda: StaticKVCache(reference.config, absmax, per_head))
    assert evals["fake_quant"] == pytest.approx(expect, rel=1e-5)
    assert abs(expect / evals["fake_quant_wo_kv"] - 1) > 1e-3  # 4-bit static KV moves the PPL
    assert _ppl(load_fake_quant(out / "fake_quant_model"), wiki_files["test"]) == pytest.approx(evals["fake_quant"], rel=1e-5)


def test_kv_static_follows_act_static_as_llmc(make_config, tmp_path, wiki_files):
    """LLMC's static KV configs set only act.static: True; the KV cache then calibrates statically."""
    from llmc.config.loader import load_config

    path = make_config({"quant": {"weight": W8, "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor",
                                                        "static": True},
                                  "kvcache": {"method": "Naive", "bit": 8, "granularity": "per_tensor"}},
                        "calib": _calib(wiki_files)})
    assert load_config(path).quant.kvcache.static is True


def test_lightllm_export_without_static_kv_is_refused(make_config, capsys):
    path = make_config({"quant": {"kvcache": {"method": "Naive", "bit": 8}}, "save": {"save_lightllm_kv_calib": True}})
    assert main(["--config", path]) == 2
    assert "save.save_lightllm_kv_calib" in capsys.readouterr().err
