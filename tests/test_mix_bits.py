"""quant.mix_bits (LLMC's schema): which setting each linear takes (LLMC's alloc_bits/get_wquantizer rules),
the bits each fake-quant weight ends on (distinct levels per group) with RTN, GPTQ and AWQ, and the refusals."""
import json

import pytest
import torch

from llmc.cli import main

W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": False, "granularity": "per_group", "group_size": 32}
W2C = {"bit": 2, "symmetric": False, "granularity": "per_channel"}


def _config(make_config, wiki_files, tmp_path, method, mix, special=None, act=None, save=None, name="mix.yml"):
    quant = {"method": method, "weight": W4, "special": special or {}, "mix_bits": mix}
    if act:
        quant["act"] = act
    return make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 64,
                                  "bs": 4},
                        "eval": {"eval_pos": ["fake_quant"], "num_samples": 2}, "quant": quant,
                        "save": {"save_path": str(tmp_path / method), **(save or {"save_fake": True})}}, name=name)


def _levels(w: torch.Tensor, group: int) -> int:
    """The most distinct values in one group of `group` consecutive weights of a row (group -1: the row)."""
    rows = w.reshape(-1, w.shape[1] if group == -1 else group)
    return max(len(torch.unique(r)) for r in rows)


# LLMC's awq_w_only_mix_bits_2.yml on 3 blocks: down_proj of blocks 0 and 2 at 8 bits, every o_proj float;
# plus q_proj of block 1 at 2 bits per channel, given twice so that the later setting wins.
MIX = {
    "setting_0": {"layer_name": ["down_proj#0-2", "q_proj#1"], "do_quant": True, "weight": W8},
    "setting_1": {"layer_name": ["o_proj"], "do_quant": False},
    "setting_2": {"layer_name": ["q_proj#1"], "do_quant": True, "weight": W2C},
}


@pytest.mark.parametrize("method, special", [("RTN", {}), ("GPTQ", {"actorder": True, "static_groups": True}),
                                             ("Awq", {"trans": True, "trans_version": "v2", "weight_clip": True}),
                                             ("SignRound", {"iters": 3, "batch_size": 4}),
                                             ("OmniQuant", {"lwc": True, "let": False, "epochs": 1}),
                                             ("TesseraQ", {"iterations": 3, "batch_size": 4, "thresholds": [0.5, 0.1]})])
def test_each_linear_ends_on_its_settings_grid(make_config, wiki_files, tmp_path, tiny_dir, method, special):
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant

    path = _config(make_config, wiki_files, tmp_path, method, MIX, special)
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0
    fake = load_fake_quant(tmp_path / method / "fake_quant_model")
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir())
    for b in range(3):
        layer = f"model.layers.{b}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            w = fake.get_submodule(f"{layer}.{name}").weight.detach()
            if name == "self_attn.o_proj":  # do_quant False: float (AWQ's scales are folded into it)
                if method != "Awq":
                    assert torch.equal(w, ref.get_submodule(f"{layer}.{name}").weight), (b, name)
                assert _levels(w, 32) > 16
            elif name == "mlp.down_proj" and b in (0, 2):
                assert 16 < _levels(w, 32) <= 32, (b, name)        # 8 bits: more levels than 4 bits have
            elif name == "self_attn.q_proj" and b == 1:
                assert _levels(w, -1) <= 4, (b, name)              # setting_2 overrides setting_0: 2 bits a row
            else:
                assert _levels(w, 32) <= 16, (b, name)             # the stage's 4 bits
    import json

    bits = json.loads((tmp_path / method / "results.json").read_text())["avg_bits"]
    assert bits > 4.5  # 8-bit and float linears raise the average above the 4-bit layers' ~4.5


def test_settings_resolve_as_llmc(tiny_dir):
    """Later settings override earlier ones for the same pattern and block; the first matching pattern (in
    first-given order) wins; a setting without act makes its layers weight-only."""
    from llmc.config.mix_bits import resolve
    from llmc.config.schema import QuantCfg
    from llmc.models import adapter_class
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir())
    adapter = adapter_class(model.config.model_type, None)(model)
    quant = QuantCfg.model_validate({
        "method": "RTN", "weight": W4, "act": {"bit": 8, "granularity": "per_token"},
        "mix_bits": {"setting_0": {"layer_name": ["proj#1"], "weight": W8, "act": {"bit": 6, "granularity": "per_token"}},
                     "setting_1": {"layer_name": ["up_proj"], "do_quant": False},
                     "setting_2": {"layer_name": ["proj#1"], "weight": W2C}}})
    floats, args = resolve(quant, adapter)
    assert floats == {f"model.layers.{b}.mlp.up_proj" for b in (0, 2)}
    # block 1: "proj" was given first, so it matches every linear there (up_proj too); setting_2 overrides it
    assert sorted(args) == sorted(f"model.layers.1.{n}" for n in adapter.block_linear_names(1))
    assert {(w.bit, w.granularity, a) for w, a in args.values()} == {(2, "per_channel", None)}


def _check(path):
    from llmc.config.checks import check_config
    from llmc.config.loader import load_config

    check_config(load_config(path))


@pytest.mark.parametrize("method, mix, save, key", [
    ("RTN", {"setting_1": {"layer_name": ["o_proj"], "do_quant": False}}, None, "quant.mix_bits"),
    ("RTN", {"setting_0": {"layer_name": ["o_proj"], "do_quant": True}}, None, "weight section"),
    ("RTN", {"setting_0": {"layer_name": ["o_proj"], "do_quant": False, "weight": W8}}, None, "do_quant False"),
    ("RTN", {"setting_0": {"layer_name": ["o_proj#1-x"], "do_quant": False}}, None, "o_proj#1-x"),
    ("QuaRot", {"setting_0": {"layer_name": ["o_proj"], "do_quant": False}}, None, "quant.mix_bits"),
    ("RTN", {"setting_0": {"layer_name": ["o_proj"], "weight": W8}}, {"save_gptq": True}, "save.save_gptq"),
    ("HQQ", {"setting_0": {"layer_name": ["o_proj"], "weight": {**W8, "symmetric": True}}}, None,
     "quant.mix_bits.setting_0"),
])
def test_bad_settings_are_refused_before_loading(make_config, wiki_files, tmp_path, method, mix, save, key):
    from llmc.errors import ConfigError

    path = _config(make_config, wiki_files, tmp_path, method, mix, save=save)
    with pytest.raises(ConfigError) as err:
        _check(path)
    assert key in str(err.value), str(err.value)
    assert main(["--config", path, "--dry-run"]) == 2


@pytest.mark.parametrize("entry, words", [("down_proj#3", "block 3 does not exist"), ("lm_head", "names no linear"),
                                          ("up_proj", "does not divide in_features")])
def test_patterns_are_checked_against_the_model(make_config, wiki_files, tmp_path, capsys, entry, words):
    weight = {**W8, "group_size": 48} if entry == "up_proj" else W8
    path = _config(make_config, wiki_files, tmp_path, "RTN", {"setting_0": {"layer_name": [entry], "weight": weight}})
    assert main(["--config", path, "--dry-run"]) == 2
    assert words in capsys.readouterr().err


def test_dry_run_lists_the_linears_of_each_setting(make_config, wiki_files, tmp_path, capsys):
    path = _config(make_config, wiki_files, tmp_path, "RTN", MIX)
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 3 blocks: down_proj of blocks 0 and 2 at 8 bits, q_proj of block 1 at 2 bits, three o_proj float
    lines = [ln.strip() for ln in out.splitlines() if "mix_bits:" in ln]
    assert lines == ["mix_bits: 2 linears int8 asym g32: model.layers.0.mlp.down_proj, model.layers.2.mlp.down_proj",
                     "mix_bits: 1 linears int2 asym per_channel: model.layers.1.self_attn.q_proj",
                     "mix_bits: 3 linears float: model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj, "
                     "model.layers.2.self_attn.o_proj"]


def _ct_per_module(folder):
    """The checkpoint as vLLM reads a mixed one: compressed-tensors matches each module to its config group,
    loads the compressed tensors and decompresses them (transformers' dequantizing load takes one scheme for
    every dense layer, so it cannot read a mix)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    raw = cfg.quantization_config
    del cfg.quantization_config
    qc = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k != "dequantize"})
    model = AutoModelForCausalLM.from_config(cfg)
    apply_quantization_config(model, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)  # the compressed layout, so the checkpoint's tensors load into it
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if ".layers." in m]
    compressor.decompress_model(model)
    return model.eval()


def test_compressed_tensors_holds_one_group_per_setting(make_config, wiki_files, tmp_path):
    """save_vllm with mix_bits: a config group per setting naming its linears, the float ones ignored; read
    module by module, the checkpoint gives the fake-quant weights exactly."""
    from llmc.export.save import load_fake_quant

    path = _config(make_config, wiki_files, tmp_path, "RTN", MIX, save={"save_fake": True, "save_vllm": True})
    assert main(["--config", path]) == 0
    out = tmp_path / "RTN"
    qc = json.loads((out / "vllm_quant_model" / "config.json").read_text())["quantization_config"]
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"]): sorted(g["targets"])
              for g in qc["config_groups"].values()}
    assert groups[(8, "group")] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert groups[(2, "channel")] == ["model.layers.1.self_attn.q_proj"]
    assert len(groups[(4, "group")]) == 3 * 7 - 3 - 2 - 1
    assert all(f"model.layers.{b}.self_attn.o_proj" in qc["ignore"] for b in range(3))
    fake = load_fake_quant(out / "fake_quant_model")
    loaded = _ct_per_module(out / "vllm_quant_model")
    for b in range(3):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            full = f"model.layers.{b}.{name}"
            assert torch.equal(loaded.get_submodule(full).weight.float(), fake.get_submodule(full).weight), full


def test_settings_of_different_compression_formats_are_refused(make_config, wiki_files, tmp_path, capsys):
    """A W8A8 setting beside weight-only linears: int-quantized and pack-quantized cannot share a checkpoint."""
    mix = {"setting_0": {"layer_name": ["down_proj"], "weight": {**W8, "symmetric": True, "granularity": "per_channel",
                                                              "group_size": -1},
                         "act": {"bit": 8, "granularity": "per_token"}}}
    path = _config(make_config, wiki_files, tmp_path, "RTN", mix, save={"save_vllm": True})
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "save.save_vllm" in err and "int-quantized, pack-quantized" in err
