"""Quantizer schemes LLMC writes: per_block weight tiles (FP8 128 x 128 as DeepSeek ships, int too), LLMC's
two-level W4A8 `bit: 48`, `qmax_to_tensor`; each against a computation written here, configs equivalent to
LLMC's run end to end on the tiny model, exports that cannot store them refuse before loading."""
import pytest
import torch
from torch import nn

from llmc.cli import main
from llmc.config.quant_spec import QuantSpecCfg
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs, fake_quant

PLAIN = ("bit", "symmetric", "granularity", "group_size")


def tiles_by_hand(w: torch.Tensor, b: int, to_grid) -> torch.Tensor:
    """Each b x b tile (the last ones partial) on its own absmax scale, one tile at a time."""
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], b):
        for j in range(0, w.shape[1], b):
            out[i:i + b, j:j + b] = to_grid(w[i:i + b, j:j + b])
    return out


def fp8_tile(t):
    s = t.abs().max() / 448
    return (t / s).to(torch.float8_e4m3fn).float() * s


def int8_tile(t):
    s = t.abs().max() / 127.5  # llmc's symmetric convention: the grid [-128, 127] spans 2 * absmax
    return torch.clamp(torch.round(t / s), -128, 127) * s


@pytest.mark.parametrize("bit,to_grid", [("e4m3", fp8_tile), (8, int8_tile)])
def test_per_block_equals_tile_by_tile(bit, to_grid):
    torch.manual_seed(0)
    w = torch.randn(10, 12) * torch.linspace(0.1, 4, 12)  # 10 rows: the last row of tiles is partial
    w[0, 0] = 30.0  # one outlier scales its own tile only
    args = QuantArgs(bit=bit, granularity="per_block", block_size=4)
    want = tiles_by_hand(w, 4, to_grid)
    assert torch.equal(fake_quant(w, args), want)
    q = QuantLinear(nn.Linear(12, 10, bias=False), args)
    q.weight.data.copy_(w)
    q.set_weight_qparams()
    assert torch.equal(q.fake_weight(), want)
    assert not torch.equal(fake_quant(w, QuantArgs(bit=bit, granularity="per_group", group_size=4)), want)


def w48_by_hand(w: torch.Tensor, g: int, int_range=(-120, 120)) -> torch.Tensor:
    """LLMC's Weight48IntegerQuantizer (bit8 symmetric per channel in int_range; bit4 asymmetric groups on
    [0, 15] of the 8-bit codes, scales and zeros clamped to the signed 8-bit range), step by step."""
    lo, hi = int_range
    s8 = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / hi
    c8 = torch.clamp(torch.round(w / s8), lo, hi)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for j in range(0, w.shape[1], g):
            grp = c8[r, j:j + g]
            s4 = ((grp.max() - grp.min()).clamp(min=1e-5) / 15).clamp(-128, 127)
            z4 = (-torch.round(grp.min() / s4)).clamp(-128, 127)
            q4 = torch.clamp(torch.round(grp / s4) + z4, 0, 15)
            out[r, j:j + g] = (q4 - z4) * s4 * s8[r]
    return out


W48 = {"bit": 48, "bit4": {"symmetric": False, "granularity": "per_group", "group_size": 16, "scales_bit": 8,
                           "scales_symmetric": True, "zeros_bit": 8, "zeros_symmetric": True},
       "bit8": {"symmetric": True, "granularity": "per_channel", "int_range": [-120, 120]}}


def test_bit48_equals_two_level_by_hand():
    torch.manual_seed(1)
    w = torch.randn(6, 48)
    w[2, 16:32] = w[2, 16:32].abs() + 1.0  # an all-positive group: its zero point lies below the 4-bit range
    w[3, :16] = 0.25  # a constant group
    args = QuantArgs.from_cfg(QuantSpecCfg(**W48))
    q = QuantLinear(nn.Linear(48, 6, bias=False), args)
    q.weight.data.copy_(w)
    q.set_weight_qparams()
    want = w48_by_hand(w, 16)
    torch.testing.assert_close(q.fake_weight(), want, rtol=1e-6, atol=0)
    # two roundings: not the one-level 4-bit grid with the same effective scales
    one_level = (torch.clamp(torch.round(w.reshape(-1, 16) / q.w_scale) + q.w_zero, 0, 15) - q.w_zero) * q.w_scale
    assert not torch.allclose(one_level.reshape(w.shape), want, rtol=1e-6, atol=0)
    assert q.w_codes.min() >= 0 and q.w_codes.max() <= 15


BLOCK = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True, "granularity": "per_block",
         "block_size": 32, "use_qtorch": True}
CONFIGS = {  # equivalents of LLMC's rtn_w_a_block, rtn_w_a_wint4aint8, rtn_w_a_wint4afp8, w8a8_combin
    "block_fp8": (BLOCK, {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True, "granularity": "per_group",
                          "group_size": 32, "use_qtorch": True}),
    "block_int8": ({"bit": 8, "symmetric": True, "granularity": "per_block", "block_size": 32}, None),
    "w4a8_int8": (W48, {"bit": 8, "symmetric": True, "granularity": "per_token"}),
    "w4a8_fp8": (W48, {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True, "granularity": "per_token"}),
    "w8a8_qmax_to_tensor": ({"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1,
                             "qmax_to_tensor": True, "calib_algo": "minmax"},
                            {"bit": 8, "symmetric": True, "granularity": "per_token", "qmax_to_tensor": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llmc_scheme_configs_dry_run_and_run(make_config, tmp_path, tiny_dir, DELETE, name):
    """--dry-run accepts each; the run ends with saved fake-quant weights equal to the scheme by hand."""
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant

    weight, act = CONFIGS[name]
    out = tmp_path / "out"
    path = make_config({"quant": {"weight": {**{k: DELETE for k in PLAIN}, **weight}, "act": act or DELETE},
                        "save": {"save_fake": True, "save_path": str(out)}})
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0
    w = AutoModelForCausalLM.from_pretrained(tiny_dir("llama")).model.layers[1].mlp.down_proj.weight.detach()
    got = load_fake_quant(out / "fake_quant_model").model.layers[1].mlp.down_proj.weight.detach()
    if weight.get("granularity") == "per_block":
        want = tiles_by_hand(w, 32, fp8_tile if weight.get("bit") == "e4m3" else int8_tile)
    elif weight.get("bit") == 48:
        want = w48_by_hand(w, 16)
    else:
        want = fake_quant(w, QuantArgs(bit=8))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


INT_BLOCK = CONFIGS["block_int8"][0]
REFUSED = [(BLOCK, "save_autoawq"), (BLOCK, "save_gptq"), (INT_BLOCK, "save_vllm"), (W48, "save_vllm"),
           (W48, "save_autoawq"), (W48, "save_gptq")]


@pytest.mark.parametrize("weight,export", REFUSED, ids=[f"{'bit48' if w is W48 else w['bit']}-{e}" for w, e in REFUSED])
def test_packed_exports_refuse_before_loading(make_config, tmp_path, capsys, DELETE, weight, export):
    out = tmp_path / "out"
    path = make_config({"quant": {"weight": {**{k: DELETE for k in PLAIN}, **weight}},
                        "save": {export: True, "save_path": str(out)}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert f"save.{export}" in err and ("per_block" in err or "two-level" in err), err
    assert "save_fake" in err
    assert not out.exists()  # refused before any weight was read


def test_block_fp8_vllm_export_reloads_with_fake_quant_logits(make_config, tmp_path, DELETE):
    """LLMC's rtn_w_a_block (FP8 block weights, FP8 per-group activations, save_vllm): compressed-tensors'
    block strategy with [ceil(out / b), in / b] scales; transformers' load computes the fake-quant logits."""
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant

    out = tmp_path / "out"
    weight, act = CONFIGS["block_fp8"]
    weight, act = {**weight, "block_size": 64}, {**act, "group_size": 64}  # k_proj's 32 rows: a partial tile
    path = make_config({"quant": {"weight": {**{k: DELETE for k in PLAIN}, **weight}, "act": act},
                        "save": {"save_fake": True, "save_vllm": True, "save_path": str(out)}})
    assert main(["--config", path]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out / "vllm_quant_model")
    k_proj = reloaded.model.layers[1].self_attn.k_proj  # 32 x 64: half of one 64 x 64 tile
    assert k_proj.weight.dtype == torch.float8_e4m3fn and tuple(k_proj.weight_scale.shape) == (1, 1)
    assert tuple(reloaded.model.layers[1].mlp.down_proj.weight_scale.shape) == (1, 2)  # 64 x 128
    fake = load_fake_quant(out / "fake_quant_model")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, fake(ids).logits)
    bad = make_config({"quant": {"weight": {**{k: DELETE for k in PLAIN}, **weight}, "act": {**act, "group_size": 32}},
                       "save": {"save_vllm": True, "save_path": str(tmp_path / "bad")}}, name="bad.yml")
    assert main(["--config", bad]) == 2


@pytest.mark.parametrize("quant,words", [
    ({"weight": {"granularity": "per_block"}}, ["quant.weight", "block_size"]),
    ({"weight": {"block_size": 32}}, ["quant.weight", "block_size", "per_block"]),
    ({"weight": {"granularity": "per_block", "block_size": 32, "symmetric": False}}, ["quant.weight", "symmetric"]),
    ({"weight": {"granularity": "per_block", "block_size": 48}}, ["quant.weight.block_size", "48", "in_features"]),
    ({"method": "GPTQ", "weight": {"granularity": "per_block", "block_size": 32}},
     ["quant.weight.granularity", "GPTQ"]),
    ({"act": {"granularity": "per_block", "block_size": 32}}, ["quant.act.granularity", "per_block"]),
    ({"weight": {"bit": 48}}, ["quant.weight", "bit4"]),
    ({"act": {"bit": 48, "bit4": W48["bit4"], "bit8": W48["bit8"]}}, ["quant.act.bit", "weight schemes"]),
    ({"weight": {"bit": 4, "bit4": W48["bit4"]}}, ["quant.weight", "bit: 48"]),
    ({"weight": {**W48, "granularity": "per_group"}}, ["quant.weight", "granularity", "bit4 and bit8"]),
    ({"weight": {**W48, "bit4": {**W48["bit4"], "scale_bit": 8}}}, ["quant.weight.bit4", "scale_bit"]),
    ({"weight": {**W48, "bit8": {"int_range": [120, -120]}}}, ["quant.weight.bit8", "int_range"]),
    ({"weight": {**W48, "bit4": {**W48["bit4"], "group_size": 24}}}, ["quant.weight.bit4.group_size", "24"]),
    ({"method": "Awq", "weight": W48}, ["quant.weight.bit", "48", "AWQ"]),
    ({"weight": {"bit": 9}}, ["quant.weight", "48"]),
    ({"weight": {"w_1": {"bit": 4}, "w_2": {"bit": 8}}}, ["quant.weight.w_1", "DGQ"]),
    ({"weight": {"qmax_to_tensor": "sometimes"}}, ["quant.weight.qmax_to_tensor"]),
])
def test_bad_scheme_keys_are_config_errors(make_config, capsys, DELETE, quant, words):
    change = dict(quant)
    if "weight" in change:
        change["weight"] = {**{k: DELETE for k in PLAIN}, **change["weight"]}
    path = make_config({"quant": change})
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
