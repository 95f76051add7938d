"""Float and 4-bit formats (llmc/quant/formats.py): every grid against an implementation written here from
its definition (OCP FP4, compressed-tensors' NVFP4 and MXFP4 arithmetic, QLoRA's NF4 construction), the
config keys, RTN and GPTQ end to end, and the NVFP4 / MXFP4 compressed-tensors exports reloaded by transformers."""
import itertools
import math
from unittest.mock import patch

import pytest
import torch

from llmc.cli import main
from llmc.quant.formats import NF4_LEVELS, round_e2m1
from llmc.quant.quantizer import QuantArgs, fake_quant

NVFP4 = QuantArgs(bit="e2m1", quant_type="nvfp4", granularity="per_group", group_size=16)
MXFP4 = QuantArgs(bit="e2m1", quant_type="mxfp4", granularity="per_group", group_size=32)
NF4 = QuantArgs(bit=4, quant_type="nf4", granularity="per_group", group_size=64)
E2M1 = QuantArgs(bit="e2m1", quant_type="float-quant", granularity="per_group", group_size=32)


def e2m1_values() -> list[float]:
    """All finite values of sign/2-bit exponent (bias 1)/1-bit mantissa, decoded bit by bit (OCP MX spec)."""
    out = []
    for s, e, m in itertools.product((0, 1), range(4), range(2)):
        mag = (m / 2) * 2.0 ** (1 - 1) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        out.append(-mag if s else mag)
    return sorted(set(out))


def nearest_e2m1(t: torch.Tensor) -> torch.Tensor:
    """Nearest value, ties to the one whose code has mantissa bit 0, by brute force over the grid."""
    grid = torch.tensor(e2m1_values(), dtype=torch.float64)
    even = torch.tensor([abs(v) not in (0.5, 1.5, 3.0, 6.0) for v in e2m1_values()])  # mantissa bit 0
    flat = t.double().clamp(-6, 6).reshape(-1, 1)
    dist = (flat - grid).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    pick = torch.where(ties.sum(1) > 1, (ties & even).float().argmax(1), ties.float().argmax(1))
    return grid[pick].reshape(t.shape).to(t.dtype)


def test_e2m1_grid_is_the_fp4_value_set():
    assert e2m1_values() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    t = torch.linspace(-8, 8, 6401)  # every tie (0.25, 0.75, ..., 5) and the saturation beyond 6
    got = round_e2m1(t)
    assert set(got.abs().unique().tolist()) == {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert torch.equal(got, nearest_e2m1(t))


def _rows(x, g):
    return x.reshape(-1, g)


def test_float_quant_e2m1_is_absmax_over_six():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    s = _rows(x, 32).abs().amax(1, keepdim=True) / 6
    assert torch.equal(fake_quant(x, E2M1), (nearest_e2m1(_rows(x, 32) / s) * s).reshape(x.shape))


def test_nvfp4_matches_its_definition():
    """Global scale 448·6/amax (float32), group scale fp8_e4m3(global·amax_g/6), values e2m1(x / (s/global))."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) * 3
    x[3, :16] *= 1e-4  # a group whose fp8 scale lands among the subnormals
    rows = _rows(x, 16)
    glob = torch.tensor(448.0 * 6.0, dtype=torch.float32) / x.abs().max()
    fp8 = (glob * rows.abs().amax(1, keepdim=True) / 6).clamp(max=448).to(torch.float8_e4m3fn).float()
    assert 0 < fp8.min() < 2 ** -6  # the subnormal case is exercised
    eff = fp8 / glob
    want = (nearest_e2m1(rows / eff) * eff).reshape(x.shape)
    assert torch.equal(fake_quant(x, NVFP4), want)


def test_mxfp4_shared_exponent():
    """Scale 2^(floor(log2 amax) - 2), one power of two higher when amax's mantissa is at least 1.75."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 128, generator=g)
    x[0, 0] = 1.75 * 4 * torch.sign(x[0, 0])  # an exact 1.75 mantissa rounds the exponent up
    x[0, 32:64] = x[0, 32:64].clamp(-1.74, 1.74)
    x[0, 32] = 1.74
    rows = _rows(x, 32)
    exps = []
    for amax in rows.abs().amax(1).tolist():
        e = math.floor(math.log2(amax))
        exps.append(e + (1 if amax / 2 ** e >= 1.75 else 0) - 2)
    assert exps[0] == 1 and exps[1] == -2  # 7.0 → 2^3 → scale 2; 1.74 → 2^0 → scale 1/4
    s = torch.tensor([2.0 ** e for e in exps]).reshape(-1, 1)
    assert torch.equal(fake_quant(x, MXFP4), (nearest_e2m1(rows / s) * s).reshape(x.shape))


def test_nf4_levels_and_nearest_level():
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0,1) at offset 0.9677, plus 0, over the max
    p = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1]
    n = torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1]
    v = torch.cat([torch.special.ndtri(p), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(n)])
    v = (v / v.abs().max()).sort().values
    assert torch.allclose(torch.tensor(NF4_LEVELS, dtype=torch.float64), v, atol=1e-6)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    rows = _rows(x, 64)
    absmax = rows.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    want = levels[((rows / absmax).unsqueeze(-1) - levels).abs().argmin(-1)] * absmax
    assert torch.equal(fake_quant(x, NF4), want.reshape(x.shape))


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("weight,words", [
    ({"quant_type": "nvfp4", "granularity": "per_group", "group_size": 32}, ["quant.weight", "nvfp4", "16"]),
    ({"quant_type": "mxfp4", "bit": 8}, ["quant.weight", "mxfp4", "bit 8"]),
    ({"quant_type": "nf4", "symmetric": False}, ["quant.weight", "nf4", "symmetric"]),
    ({"quant_type": "int-quant", "bit": "e2m1"}, ["quant.weight", "float-quant"]),
    ({"quant_type": "float-quant", "bit": 4}, ["quant.weight", "e2m1"]),
    ({"quant_type": "nvfp4", "scale_dtype": "float16"}, ["quant.weight", "scale_dtype"]),
    ({"quant_type": "nf4", "use_qtorch": True}, ["quant.weight", "use_qtorch"]),
    ({"quant_type": "fp4"}, ["quant.weight", "quant_type", "nvfp4"]),
])
def test_bad_format_settings_are_config_errors(make_config, capsys, weight, words):
    from conftest import _DELETE

    base = {k: _DELETE for k in ("bit", "symmetric", "granularity", "group_size")}
    assert main(["--config", make_config({"quant": {"weight": {**base, **weight}}}), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_act_nf4_and_special_mismatch_refused(make_config, capsys):
    assert main(["--config", make_config({"quant": {"act": {"quant_type": "nf4"}}}), "--dry-run"]) == 2
    assert "weight-only" in capsys.readouterr().err
    cfg = make_config({"quant": {"weight": {"quant_type": "float-quant", "bit": "e2m1", "symmetric": True},
                                 "special": {"quant_type": "int-quant"}}})
    assert main(["--config", cfg, "--dry-run"]) == 2
    assert "special.quant_type" in capsys.readouterr().err


def test_llmc_fp_keys_accepted_with_log_lines(make_config):
    from loguru import logger

    from llmc.config.loader import load_config

    seen = []
    sink = logger.add(lambda m: seen.append(str(m)), level="INFO")
    try:
        cfg = load_config(make_config({"quant": {"method": "RTN", "weight": {
            "quant_type": "float-quant", "bit": "e2m1", "symmetric": False, "granularity": "per_group",
            "group_size": 32, "use_qtorch": True}, "special": {"quant_type": "float-quant"}}}))
    finally:
        logger.remove(sink)
    assert cfg.quant.weight.symmetric and cfg.quant.special == {}
    assert any("use_qtorch" in s for s in seen) and any("symmetric: False" in s for s in seen)


# ------------------------------------------------------------------------------------------- end to end

FORMAT_WEIGHTS = {
    "fp4": {"quant_type": "float-quant", "bit": "e2m1", "granularity": "per_group", "group_size": 32},
    "nvfp4": {"quant_type": "nvfp4"},
    "mxfp4": {"quant_type": "mxfp4"},
    "nf4": {"quant_type": "nf4"},
}


GROUP = {"fp4": 32, "nvfp4": 16, "mxfp4": 32, "nf4": 64}


def on_grid(w: torch.Tensor, fmt: str) -> bool:
    """Every group is s · (grid values) for one s: for NF4 s is the group's absmax (a level is ±1); for e2m1
    the group's absmax is one of the positive values times s."""
    rows = w.reshape(-1, GROUP[fmt]).double()
    amax = rows.abs().amax(1, keepdim=True).clamp(min=1e-30)
    if fmt == "nf4":
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
        return bool(((rows / amax).unsqueeze(-1) - levels).abs().amin(-1).max() < 1e-5)
    grid = torch.tensor([v for v in e2m1_values() if v >= 0], dtype=torch.float64)
    ok = torch.zeros(rows.shape[0], dtype=torch.bool)
    for top in grid[1:]:
        t = rows / (amax / top)
        ok |= ((t.unsqueeze(-1).abs() - grid).abs().amin(-1) < 1e-4).all(1)
    return bool(ok.all())


@pytest.mark.parametrize("fmt", list(FORMAT_WEIGHTS))
def test_rtn_and_gptq_run_and_save_fake(make_config, tmp_path, wiki_files, tiny_dir, fmt):
    """Both methods end to end on a tiny model; the saved fake-quant weights lie on the format's grid, and
    GPTQ's logits are closer to the float model's than RTN's."""
    from conftest import _DELETE
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant
    from tiny import make_tokenizer

    weight = {**{k: _DELETE for k in ("bit", "symmetric", "granularity", "group_size")}, **FORMAT_WEIGHTS[fmt]}
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 16, "seq_len": 64, "bs": 4}
    ids = make_tokenizer()(open(wiki_files["test"]).read()[:3000], return_tensors="pt").input_ids[:, :256]
    float_model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert not on_grid(float_model.model.layers[1].mlp.down_proj.weight.detach(), fmt)  # the check can fail
    with torch.no_grad():
        ref = float_model(ids).logits
    err = {}
    for method in ("RTN", "GPTQ"):
        out = tmp_path / method
        path = make_config({"calib": calib, "eval": {"eval_pos": ["fake_quant"], "num_samples": 1},
                            "quant": {"method": method, "weight": weight},
                            "save": {"save_path": str(out), "save_fake": True}}, name=f"{method}.yml")
        assert main(["--config", path]) == 0
        model = load_fake_quant(out / "fake_quant_model")
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            assert on_grid(model.model.layers[1].get_submodule(name).weight.detach(), fmt), (method, name)
        with torch.no_grad():
            err[method] = (model(ids).logits - ref).pow(2).mean().item()
    assert err["GPTQ"] < err["RTN"], err


# ------------------------------------------------------------------------------------------------ exports

def _quantized(wargs, dtype):
    """A tiny llama in `dtype` whose block linears are RTN QuantLinears of `wargs`."""
    from llmc.models.adapter import adapter_class, set_module
    from llmc.quant.fake_linear import QuantLinear
    from tiny import make_model

    model = make_model("llama").to(dtype)
    adapter = adapter_class(model.config.model_type, None)(model)
    for block in adapter.block_list():
        for name in adapter.linear_names():
            q = QuantLinear(block.get_submodule(name), wargs)
            q.set_weight_qparams()
            set_module(block, name, q)
    return model


@pytest.mark.parametrize("wargs,dtype", [(NVFP4, torch.bfloat16), (MXFP4, torch.bfloat16), (MXFP4, torch.float32),
                                         (NVFP4, torch.float32)])
def test_fp4_exports_reload_in_transformers(tmp_path, wargs, dtype):
    """save_vllm writes nvfp4-/mxfp4-pack-quantized; `from_pretrained(folder)` computes the fake-quant logits.
    compressed-tensors dequantizes FP4 to bfloat16: exact for bfloat16 models and for MXFP4 (value x power
    of two), while a float32 NVFP4 model gets its fake-quant weights rounded to bfloat16."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmc.export import compressed
    from llmc.export.save import save_fake_quant
    from tiny import make_tokenizer

    model = _quantized(wargs, dtype)
    compressed.save(model, make_tokenizer(), tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == f"{wargs.quant_type}-pack-quantized"
    assert config.get("dequantize", False) is (dtype != torch.bfloat16)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    q = model.model.layers[0].self_attn.q_proj
    prefix = "model.layers.0.self_attn.q_proj."
    assert tensors[prefix + "weight_packed"].dtype == torch.uint8
    assert tensors[prefix + "weight_packed"].shape == (q.out_features, q.in_features // 2)
    scale = tensors[prefix + "weight_scale"]
    assert scale.shape == (q.out_features, q.in_features // wargs.group_size)
    if wargs.quant_type == "nvfp4":
        assert scale.dtype == torch.float8_e4m3fn and tensors[prefix + "weight_global_scale"].dtype == torch.float32
        assert torch.equal(scale.float() / tensors[prefix + "weight_global_scale"], q.w_scale.reshape(scale.shape))
    else:
        assert scale.dtype == torch.uint8 and torch.equal(torch.exp2(scale.float() - 127), q.w_scale.reshape(scale.shape))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    # the reference: the fake-quant model as users reload it (save_fake), through the same transformers forward
    save_fake_quant(model, make_tokenizer(), tmp_path / "fake")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=dtype).eval()
    bf16_weights = wargs.quant_type == "nvfp4" and dtype != torch.bfloat16
    seen = {}
    linear_forward = torch.nn.Linear.forward

    def spy(self, x):  # the weights compressed-tensors hands each linear
        seen.setdefault(id(self), self.weight.detach().clone())
        return linear_forward(self, x)

    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), patch.object(torch.nn.Linear, "forward", spy):
        got = loaded(ids).logits
    for i, layer in enumerate(loaded.model.layers):
        for name in [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]:
            fake = model.model.layers[i].get_submodule(name).fake_weight()
            w = seen[id(layer.get_submodule(name))]
            assert torch.equal(w, fake.to(torch.bfloat16).to(w.dtype) if bf16_weights else fake), (i, name)
            if bf16_weights:  # what compressed-tensors 0.20.1 loads: the fake-quant weight rounded to bfloat16
                ref.model.layers[i].get_submodule(name).weight.data = w.float()
    with torch.no_grad():
        expected = ref(ids).logits
    assert torch.allclose(got.float(), expected.float(), atol=1e-5, rtol=0), (got - expected).abs().max()


def test_nf4_and_plain_e2m1_exports_refused(make_config, capsys):
    from conftest import _DELETE

    base = {k: _DELETE for k in ("bit", "symmetric", "granularity", "group_size")}
    for weight in ({"quant_type": "nf4"}, FORMAT_WEIGHTS["fp4"]):
        cfg = make_config({"quant": {"weight": {**base, **weight}}, "save": {"save_vllm": True}})
        assert main(["--config", cfg]) == 2  # refused before any weight loads
        assert "save.save_vllm" in capsys.readouterr().err
    for key in ("save_autoawq", "save_gptq"):
        cfg = make_config({"quant": {"weight": {**base, "quant_type": "nf4"}}, "save": {key: True}})
        assert main(["--config", cfg]) == 2
        assert f"save.{key}" in capsys.readouterr().err


@pytest.mark.parametrize("weight", [
    # LLMC's configs/quantization/methods/FP_Quant/awq_we2m1a16_g128.yml, with the tiny model's group size
    {"quant_type": "float-quant", "bit": "e2m1", "symmetric": False, "granularity": "per_group", "group_size": 32,
     "use_qtorch": True},
    {"quant_type": "nvfp4"},
])
def test_awq_with_fp4_runs_and_lands_on_the_grid(make_config, tmp_path, wiki_files, weight):
    from conftest import _DELETE

    from llmc.export.save import load_fake_quant

    base = {k: _DELETE for k in ("bit", "symmetric", "granularity", "group_size")}
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 64, "bs": -1}
    cfg = make_config({"calib": calib, "eval": {"eval_pos": ["fake_quant"], "num_samples": 1},
                       "quant": {"method": "Awq", "weight": {**base, **weight},
                                 "special": {"quant_type": weight["quant_type"], "trans": True,
                                             "trans_version": "v2", "weight_clip": True, "clip_sym": True}},
                       "save": {"save_fake": True}})
    assert main(["--config", cfg]) == 0
    model = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    fmt = "fp4" if weight["quant_type"] == "float-quant" else "nvfp4"
    assert on_grid(model.model.layers[2].mlp.up_proj.weight.detach(), fmt)
