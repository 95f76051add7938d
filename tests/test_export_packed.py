"""Packed exports (AutoAWQ, GPTQ, compressed-tensors) on tiny models: every format is unpacked here with
its documented layout (independently of llmc's packer) and must give back llmc's grid exactly. Loading by
the clients themselves: tests/test_export_clients.py (transformers) and test_export_clients_gptqmodel.py."""
import json

import pytest
import torch

from llmc.algorithms.gptq import GPTQOptions, gptq_quantize
from llmc.cli import main
from llmc.errors import ConfigError
from llmc.export import autoawq, compressed, gptq_format
from llmc.export.packing import pack_int32
from llmc.models.adapter import adapter_class, set_module
from llmc.quant.fake_linear import QuantLinear, quant_linears
from llmc.quant.quantizer import QuantArgs
from safetensors.torch import load_file
from tiny import make_model, make_tokenizer

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def W(bit=4, symmetric=False, gran="per_group", group=32):
    return QuantArgs(bit=bit, symmetric=symmetric, granularity=gran, group_size=group if gran == "per_group" else -1)


def quantized(wargs, aargs=None, family="llama", actorder=False, fp16_scales=False, skip=()):
    """A tiny model whose block linears are QuantLinears on llmc's grid (RTN, or GPTQ with act order)."""
    model = make_model(family)
    adapter = adapter_class(model.config.model_type, None)(model)
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(adapter.block_list()):
        for name in adapter.linear_names():
            if f"{adapter.block_name(i)}.{name}" in skip:
                continue
            q = QuantLinear(block.get_submodule(name), wargs, aargs)
            if actorder:
                X = torch.randn(256, q.in_features, generator=g) * torch.rand(q.in_features, generator=g) * 3
                H = 2 * X.T @ X / 256
                Q, scale, zero, g_idx = gptq_quantize(q.weight.data, H, wargs, GPTQOptions(actorder=True))
                q.weight.data.copy_(Q)
                q.set_weight_qparams(scale, zero, g_idx)
            else:
                q.set_weight_qparams()
            if fp16_scales:  # a grid whose scales fp16 holds exactly: fp16-scale formats must then match bit for bit
                q.set_weight_qparams(q.w_scale.half().float(), q.w_zero, q.w_gidx)
            if aargs is not None and aargs.static:
                q.act_quant.set_static(torch.tensor([[-2.5]]), torch.tensor([[3.0]]))
            set_module(block, name, q)
    return model


def layers(model):
    return {name: q for name, q in quant_linears(model)}


def read(folder):
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


def unpack(words, bits, dim):
    """The format docs' reading: a run of words is one little-endian bit stream; value j is bits b*j.. of it."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    stream = (w.unsqueeze(-1) >> torch.arange(32)) & 1                  # [..., words, 32] bits, LSB first
    stream = stream.reshape(*w.shape[:-1], -1, bits)                    # consecutive b-bit fields
    values = (stream << torch.arange(bits)).sum(-1)
    return values.movedim(-1, dim)


def assert_packed_exports_hold(model, folder, group: int, bits: int = 4) -> None:
    """The AutoAWQ and GPTQ files llmc wrote under `folder` unpack to every QuantLinear's fake-quant weight bit
    for bit (learned methods leave ordinary grids, so their exports must too)."""
    autoawq.save(model, make_tokenizer(), folder / "awq")
    gptq_format.save(model, make_tokenizer(), folder / "gptq")
    awq, _ = read(folder / "awq")
    gptq, cfg = read(folder / "gptq")
    for name, q in quant_linears(model):
        fake = q.fake_weight().detach()
        w, _, _ = awq_dequant({k: awq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, group)
        assert torch.equal(w, fake), name
        wg = gptq_dequant({k: gptq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits,
                          cfg["quantization_config"]["checkpoint_format"])[0]
        assert torch.equal(wg, fake), name


def fake(q):
    return q.fake_weight().detach()


# ---------------------------------------------------------------- packing helper against a hand-made case

def test_pack_int32_layouts():
    assert pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4, dim=1).item() == 0xF7654321 - (1 << 32)
    v = torch.arange(32) % 8
    words = pack_int32(v.unsqueeze(1), 3, dim=0)  # 32 3-bit values → 3 words, value 10 straddles words 0 and 1
    assert words.shape == (3, 1) and torch.equal(unpack(words, 3, 0)[:, 0], v)
    assert (int(words[0, 0]) >> 30) & 3 == 10 % 8 & 3 and int(words[1, 0]) & 1 == (10 % 8) >> 2


# ---------------------------------------------------------------- AutoAWQ

def awq_dequant(t, group):
    q = unpack(t["qweight"], 4, 1)      # [in, out] in nibble order
    z = unpack(t["qzeros"], 4, 1)
    inv = torch.empty(8, dtype=torch.long)
    inv[torch.tensor(AWQ_ORDER)] = torch.arange(8)  # nibble i holds column 8k + ORDER[i]
    perm = (torch.arange(0, q.shape[1], 8).unsqueeze(1) + inv).reshape(-1)
    q, z = q[:, perm], z[:, perm]
    rows = torch.arange(q.shape[0]) // group
    return ((q - z[rows]).float() * t["scales"].float()[rows]).t(), q, z


@pytest.mark.parametrize("symmetric", [False, True])
def test_autoawq_unpacks_to_llmc_grid(tmp_path, symmetric):
    model = quantized(W(4, symmetric, group=32), fp16_scales=True, skip={"model.layers.1.mlp.down_proj"})
    autoawq.save(model, make_tokenizer(), tmp_path / "awq")
    tensors, config = read(tmp_path / "awq")
    qc = config["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["model.layers.1.mlp.down_proj", "lm_head"]}
    for name, q in layers(model).items():
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (q.in_features, q.out_features // 8)
        assert t["qzeros"].shape == (q.in_features // 32, q.out_features // 8) and t["scales"].dtype == torch.float16
        w, codes, zeros = awq_dequant(t, 32)
        assert torch.equal(w, fake(q))  # bit for bit
        assert torch.equal(codes.t() - 8, q.int_weight().reshape(q.out_features, -1).long())
        assert bool((zeros == 8).all()) == symmetric
    assert "model.layers.1.mlp.down_proj.weight" in tensors  # the ignored layer stays float


def test_fp16_scales_are_the_only_rounding(tmp_path):
    model = quantized(W(4, False, group=32))  # float32 scales
    autoawq.save(model, make_tokenizer(), tmp_path / "awq")
    gptq_format.save(model, make_tokenizer(), tmp_path / "gptq")
    awq, _ = read(tmp_path / "awq")
    gptq, gptq_cfg = read(tmp_path / "gptq")
    for name, q in layers(model).items():
        w, _, _ = awq_dequant({k: awq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, 32)
        wg = gptq_dequant({k: gptq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4,
                          gptq_cfg["quantization_config"]["checkpoint_format"])[0]
        assert torch.equal(w, wg)
        rel = (w - fake(q)).abs().max() / fake(q).abs().max()
        assert 0 < rel < 2 ** -11  # half an fp16 ulp of the scale, no more


# ---------------------------------------------------------------- GPTQ

def gptq_dequant(t, bits, checkpoint_format="gptq"):
    q = unpack(t["qweight"], bits, 0)                  # [in, out]
    z = unpack(t["qzeros"], bits, 1)
    if checkpoint_format == "gptq":                    # v1 stores zero - 1; v2 the zero point itself
        z = z + 1
    g = t["g_idx"].long()
    return ((q - z[g]).float() * t["scales"].float()[g]).t(), q, z


@pytest.mark.parametrize("bits,symmetric,gran,actorder", [
    (4, False, "per_group", False), (4, True, "per_group", False), (3, False, "per_group", False),
    (2, False, "per_group", False), (8, True, "per_channel", False), (4, False, "per_group", True),
    (4, True, "per_tensor", False)])
def test_gptq_unpacks_to_llmc_grid(tmp_path, bits, symmetric, gran, actorder):
    wargs = W(bits, symmetric, gran, group=32)
    model = quantized(wargs, actorder=actorder, fp16_scales=True)
    gptq_format.save(model, make_tokenizer(), tmp_path / "gptq")
    tensors, config = read(tmp_path / "gptq")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] == symmetric
    # v1 for symmetric weights; asymmetric ones as v2, the only asymmetric GPTQ format GPTQModel loads
    assert qc["checkpoint_format"] == ("gptq" if symmetric else "gptq_v2") and qc["desc_act"] == actorder
    assert qc["group_size"] == (32 if gran == "per_group" else -1)
    for name, q in layers(model).items():
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        groups = q.in_features // 32 if gran == "per_group" else 1
        assert t["qweight"].shape == (q.in_features * bits // 32, q.out_features)
        assert t["qzeros"].shape == (groups, q.out_features * bits // 32) and t["g_idx"].dtype == torch.int32
        w, codes, zeros = gptq_dequant(t, bits, qc["checkpoint_format"])
        assert torch.equal(w, fake(q))
        assert torch.equal(codes.t() - 2 ** (bits - 1), q.int_weight().reshape(q.out_features, -1).long())
        if symmetric:
            assert bool((zeros == 2 ** (bits - 1)).all())
        if actorder:
            assert torch.equal(t["g_idx"], q.w_gidx.int()) and not torch.equal(t["g_idx"], t["g_idx"].sort().values)


def test_gptq_v2_stores_every_zero_point(tmp_path):
    model = quantized(W(4, False, group=32), fp16_scales=True)
    q = layers(model)["model.layers.2.mlp.up_proj"]
    zero = q.w_zero.clone()
    zero[3], zero[5] = -8, 7  # unsigned 0 and 15: v1 has no encoding for 0 (it would store -1)
    q.set_weight_qparams(q.w_scale, zero)
    gptq_format.save(model, make_tokenizer(), tmp_path / "gptq")
    tensors, config = read(tmp_path / "gptq")
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    t = {k: tensors[f"model.layers.2.mlp.up_proj.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    w, _, zeros = gptq_dequant(t, 4, "gptq_v2")
    assert torch.equal(w, fake(q))
    by_row = zeros.t().reshape(-1)  # the [out, groups] table, in the order of llmc's grouped rows
    assert by_row[3].item() == 0 and by_row[5].item() == 15


def test_gptq_block_rules_for_ignored_layers(tmp_path):
    model = quantized(W(4, True), skip={"model.layers.0.mlp.down_proj"})
    gptq_format.save(model, make_tokenizer(), tmp_path / "gptq")
    qc = read(tmp_path / "gptq")[1]["quantization_config"]
    assert qc["dynamic"] == {"-:^model[.]layers[.]0[.]mlp[.]down_proj$": {}}
    assert "modules_in_block_to_quantize" not in qc  # block 0 differs from the others
    model = quantized(W(4, True), skip={f"model.layers.{i}.mlp.down_proj" for i in range(3)})
    gptq_format.save(model, make_tokenizer(), tmp_path / "gptq2")
    qc = read(tmp_path / "gptq2")[1]["quantization_config"]
    assert "mlp.down_proj" not in qc["modules_in_block_to_quantize"][0] and len(qc["dynamic"]) == 3


# ---------------------------------------------------------------- compressed-tensors

def ct_dequant(t, bits, wargs):
    offset = 2 ** (bits - 1)
    if "weight_packed" in t:
        out, inp = t["weight_shape"].tolist()
        q = unpack(t["weight_packed"], bits, 1)[:, :inp] - offset
        z = unpack(t["weight_zero_point"], bits, 0)[:out] - offset if "weight_zero_point" in t else 0
    else:
        q, z = t["weight"].float(), t["weight_zero_point"].long() if "weight_zero_point" in t else 0
        inp = q.shape[1]
    s = t["weight_scale"].float()
    if wargs.granularity == "per_group":
        cols = torch.arange(inp) // wargs.group_size
        s = s[:, cols]
        z = z[:, cols] if torch.is_tensor(z) else z
    return (q - z) * s


def ct_load(folder):
    """transformers' plain load, as a user runs it (tests/test_export_clients.py checks every case)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


CT_CASES = {  # name: (weight, act, format)
    "w4g32_asym": (W(4, False), None, "pack-quantized"),
    "w4g32_sym": (W(4, True), None, "pack-quantized"),
    "w4_channel_asym": (W(4, False, "per_channel"), None, "pack-quantized"),
    "w8_channel_sym": (W(8, True, "per_channel"), None, "pack-quantized"),
    "w8a8_token": (W(8, True, "per_channel"), QuantArgs(bit=8, granularity="per_token"), "int-quantized"),
    "w8a8_static": (W(8, True, "per_channel"),
                    QuantArgs(bit=8, symmetric=False, granularity="per_tensor", static=True), "int-quantized"),
    "fp8_token": (W("e4m3", True, "per_channel"), QuantArgs(bit="e4m3", granularity="per_token"), "float-quantized"),
}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_unpacks_to_llmc_grid(tmp_path, case):
    wargs, aargs, fmt = CT_CASES[case]
    model = quantized(wargs, aargs)
    compressed.save(model, make_tokenizer(), tmp_path / "ct", recipe={"quant": {"method": "RTN"}})
    tensors, config = read(tmp_path / "ct")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    assert "method: RTN" in (tmp_path / "ct" / "llmc_recipe.yaml").read_text()
    bits = 8 if wargs.is_float else wargs.bit
    for name, q in layers(model).items():
        t = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert torch.equal(ct_dequant(t, bits, wargs), fake(q))
        if aargs is not None and aargs.static:
            assert torch.equal(t["input_scale"], q.act_quant.scale.reshape(1))
            assert torch.equal(t["input_zero_point"].float(), q.act_quant.zero.reshape(1))


# ---------------------------------------------------------------- refusals

REFUSALS = [  # (format, weight, act, g_idx, kvcache, expected words)
    (autoawq, W(8), None, False, False, ["save.save_autoawq", "AutoAWQ", "quant.weight.bit=8"]),
    (autoawq, W(4, gran="per_channel"), None, False, False, ["AutoAWQ", "granularity=per_channel"]),
    (autoawq, W(4), QuantArgs(bit=8, granularity="per_token"), False, False, ["AutoAWQ", "quant.act", "weight-only"]),
    (autoawq, W(4), None, True, False, ["AutoAWQ", "actorder", "static_groups"]),
    (autoawq, W("e4m3", True, "per_channel"), None, False, False, ["AutoAWQ", "bit=e4m3"]),
    (gptq_format, W(5), None, False, False, ["save.save_gptq", "GPTQ", "bit=5"]),
    (gptq_format, W(4), None, False, True, ["GPTQ", "quant.kvcache"]),
    (gptq_format, W(4), QuantArgs(bit=8, granularity="per_token"), False, False, ["GPTQ", "weight-only"]),
    (compressed, W("e5m2", True, "per_channel"), None, False, False, ["compressed-tensors", "bit=e5m2"]),
    (compressed, W(4), None, True, False, ["compressed-tensors", "actorder", "g_idx"]),
    (compressed, W(8, True, "per_channel"), QuantArgs(bit=8, granularity="per_head", head_num=4), False, False,
     ["compressed-tensors", "granularity=per_head"]),
    (compressed, W(8, True, "per_channel"), QuantArgs(bit="e4m3", granularity="per_token"), False, False,
     ["compressed-tensors", "act.bit=e4m3"]),
    (compressed, None, QuantArgs(bit=8, granularity="per_token"), False, False, ["without weight quantization"]),
]


@pytest.mark.parametrize("fmt,wargs,aargs,g_idx,kv,words", REFUSALS)
def test_refusals_name_the_setting_and_format(fmt, wargs, aargs, g_idx, kv, words):
    from llmc.export.packing import Spec

    key = {autoawq: "save.save_autoawq", gptq_format: "save.save_gptq", compressed: "save.save_vllm"}[fmt]
    with pytest.raises(ConfigError) as err:
        fmt.check(Spec(wargs, aargs, g_idx, kv), key)
    for word in words:
        assert word in str(err.value)


def test_layer_shape_refused_before_writing(tmp_path):
    model = quantized(W(4, False, group=32))
    q = layers(model)["model.layers.0.self_attn.k_proj"]  # out 32 → make it 36 wide
    bad = QuantLinear(torch.nn.Linear(q.in_features, 36, bias=False), q.wargs)
    bad.set_weight_qparams()
    set_module(model, "model.layers.0.self_attn.k_proj", bad)
    with pytest.raises(ConfigError, match="AutoAWQ.*k_proj \\(out_features 36\\)"):
        autoawq.save(model, make_tokenizer(), tmp_path / "awq")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- end to end through the CLI

def test_cli_writes_all_three_formats(make_config, tmp_path):
    path = make_config({"save": {"save_autoawq": True, "save_gptq": True, "save_vllm": True, "save_fake": True}})
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    from llmc.export.save import load_fake_quant

    ref = load_fake_quant(out / "fake_quant_model")
    ref_w = {n: m.weight.detach() for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    awq, awq_cfg = read(out / "autoawq_quant_model")
    gptq, gptq_cfg = read(out / "gptq_quant_model")
    gptq_fmt = gptq_cfg["quantization_config"]["checkpoint_format"]
    assert awq_cfg["quantization_config"]["group_size"] == 32 and gptq_cfg["quantization_config"]["bits"] == 4
    for name in [n for n in ref_w if ".layers." in n]:
        w_awq = awq_dequant({k: awq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, 32)[0]
        w_gptq = gptq_dequant({k: gptq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4,
                              gptq_fmt)[0]
        assert torch.equal(w_awq, w_gptq)
        # save_autoawq/save_gptq make the run find float16 scales, so the checkpoints are the fake-quant
        # weights bit for bit
        assert torch.equal(w_awq, ref_w[name])
    assert "RTN" in (out / "vllm_quant_model" / "llmc_recipe.yaml").read_text()
    loaded = ct_load(out / "vllm_quant_model")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_cli_refuses_before_loading_weights(make_config, capsys, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the export settings were refused")

    monkeypatch.setattr("llmc.run.load_model", no_weights)
    path = make_config({"quant": {"weight": {"bit": 8}}, "save": {"save_autoawq": True}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "save.save_autoawq" in err and "quant.weight.bit=8" in err and "AutoAWQ" in err


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_other_families_biases_and_untied_heads(tmp_path, family):
    model = quantized(W(4, True), family=family)
    for fmt, folder in ((autoawq, "awq"), (gptq_format, "gptq"), (compressed, "ct")):
        fmt.save(model, make_tokenizer(), tmp_path / folder)
    tensors, _ = read(tmp_path / "gptq")
    for name, q in layers(model).items():
        if q.bias is not None:
            assert torch.equal(tensors[f"{name}.bias"], q.bias)
    loaded = ct_load(tmp_path / "ct")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_compressed_tensors_bfloat16_model_stores_scales_in_its_dtype(tmp_path):
    model = quantized(W(8, False, "per_channel")).to(torch.bfloat16)
    compressed.save(model, make_tokenizer(), tmp_path / "ct")  # its own check: dequantizes onto llmc's codes
    tensors, config = read(tmp_path / "ct")
    q = layers(model)["model.layers.0.mlp.down_proj"]
    t = {k[len("model.layers.0.mlp.down_proj") + 1:]: v for k, v in tensors.items()
         if k.startswith("model.layers.0.mlp.down_proj.")}
    assert t["weight_scale"].dtype == torch.bfloat16 and config["dtype"] == "bfloat16"
    codes = unpack(t["weight_packed"], 8, 1) - 128
    assert torch.equal(codes.float(), q.int_weight().reshape(codes.shape))


@pytest.mark.parametrize("static_groups", [False, True])
def test_config_check_sees_gptq_act_order(make_config, wiki_files, static_groups):
    from llmc.config import load_config
    from llmc.export.packing import packed_exports

    config = load_config(make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 2, "seq_len": 16},
        "quant": {"method": "GPTQ", "special": {"actorder": True, "static_groups": static_groups}},
        "save": {"save_gptq": True, "save_vllm": True}}))
    if static_groups:  # contiguous groups: every format can store them
        assert [f.folder for f in packed_exports(config)] == ["gptq_quant_model", "vllm_quant_model"]
    else:
        with pytest.raises(ConfigError, match="save.save_vllm.*actorder without static_groups"):
            packed_exports(config)


@pytest.mark.parametrize("value", [True, False])
def test_llmcs_save_autogptq_is_the_gptq_export(make_config, value):
    """LLMC's configs carry save_autogptq (AutoGPTQ's checkpoint): True writes the GPTQ folder, False nothing."""
    from llmc.config import load_config
    from llmc.export.packing import packed_exports

    config = load_config(make_config({"save": {"save_autogptq": value}}))
    assert [f.folder for f in packed_exports(config)] == (["gptq_quant_model"] if value else [])


def test_cli_gptq_act_order_writes_g_idx(make_config, wiki_files, tmp_path):
    path = make_config({
        "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32},
        "quant": {"method": "GPTQ", "weight": {"symmetric": True}, "special": {"actorder": True}},
        "save": {"save_gptq": True, "save_fake": True}})
    assert main(["--config", path]) == 0
    from llmc.export.save import load_fake_quant

    ref = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    gptq, config = read(tmp_path / "out" / "gptq_quant_model")
    qc = config["quantization_config"]
    assert qc["desc_act"] is True and qc["checkpoint_format"] == "gptq"  # symmetric: v1
    name = "model.layers.1.mlp.down_proj"
    t = {k: gptq[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert not torch.equal(t["g_idx"], t["g_idx"].sort().values)  # groups follow the act order
    w = ref.get_submodule(name).weight.detach()
    assert torch.allclose(gptq_dequant(t, 4)[0], w, rtol=0, atol=w.abs().max().item() * 2 ** -11)
