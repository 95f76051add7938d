"""Checkpoints stored in block-wise FP8 (DeepSeek-V3's release format: float8_e4m3fn weights, one float32
`weight_scale_inv` per block, `quantization_config.quant_method: fp8`), read with LLMC's keys
`torch_dtype: torch.float8_e4m3fn` + `block_wise_quant: True`: dequantized at load, then quantized."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc.cli import main
from tiny import make_model, make_tokenizer

BLOCK = 16


def block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's quantization: per block x block tile (edge tiles partial) scale = amax / 448, fp8 = w / scale."""
    o, i = w.shape
    bo, bi = -(-o // block), -(-i // block)
    padded = torch.zeros(bo * block, bi * block)
    padded[:o, :i] = w.float()
    tiles = padded.reshape(bo, block, bi, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(bo * block, bi * block)[:o, :i]
    return q.contiguous(), scale.float()


def dequant(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def hub_layout(tensors: dict) -> dict:
    """transformers 5 saves experts fused ([E, 2I, H] gate_up, [E, H, I] down); DeepSeek's release stores
    one 2-D matrix per expert, each with its own FP8 blocks."""
    out = {}
    for k, w in tensors.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            half = w.shape[1] // 2
            for e in range(w.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = w[e, :half].clone()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = w[e, half:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(w.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = w[e].clone()
        else:
            out[k] = w
    return out


def write_block_fp8(folder: Path, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Rewrite a saved checkpoint as DeepSeek ships it: experts one 2-D matrix each, every decoder
    projection (router excluded) in float8_e4m3fn with a `weight_scale_inv` per block x block tile, and
    `quantization_config` saying so; returns the dequantized weights the load must give."""
    stored, expected = {}, {}
    for f in folder.glob("*.safetensors"):
        tensors = hub_layout(load_file(f))
        for k, w in tensors.items():
            if w.dim() == 2 and ".layers." in k and k.endswith("proj.weight") and "gate.weight" not in k:
                q, s = block_fp8(w, block)
                stored[k], stored[k.removesuffix("weight") + "weight_scale_inv"] = q, s
                expected[k] = dequant(q, s, block)
            else:
                stored[k] = w
        f.unlink()
    save_file(stored, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return expected


@pytest.fixture(scope="module")
def fp8_deepseek(tmp_path_factory):
    """A tiny DeepSeek-V3 whose decoder linears are stored in block-wise FP8 (experts included)."""
    folder = tmp_path_factory.mktemp("fp8") / "tiny-dsv3-fp8"
    make_model("deepseek_v3").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder, write_block_fp8(folder)


def _config(make_config, folder, tmp_path, **model):
    return make_config({"model": {"path": str(folder), "type": "DeepseekV3", "torch_dtype": "torch.float8_e4m3fn",
                                  "block_wise_quant": True, **model},
                        "eval": {"eval_pos": ["fake_quant"]},
                        "save": {"save_fake": True, "save_path": str(tmp_path / "out")}})


def test_block_wise_fp8_checkpoint_is_dequantized_then_quantized(make_config, fp8_deepseek, tmp_path):
    folder, expected = fp8_deepseek
    cfg = _config(make_config, folder, tmp_path)
    assert main(["--config", cfg, "--dry-run"]) == 0
    from llmc.config.loader import load_config
    from llmc.models.load import load_model

    model, _ = load_model(load_config(cfg).model, torch.device("cpu"))
    assert not hasattr(model.config, "quantization_config")
    got = dict(model.named_parameters())
    assert set(expected) <= set(got)  # llmc's unfused experts carry the checkpoint's per-expert names
    assert any(".experts.3.down_proj" in name for name in expected)
    for name, w in expected.items():
        assert torch.equal(got[name].float(), w), name
    assert main(["--config", cfg]) == 0
    saved = json.loads((tmp_path / "out" / "fake_quant_model" / "config.json").read_text())
    assert "quantization_config" not in saved or saved["quantization_config"].get("quant_method") != "fp8"


@pytest.mark.parametrize("model, key", [({"torch_dtype": "auto", "block_wise_quant": False}, "model.torch_dtype"),
                                        ({"block_wise_quant": False}, "model.block_wise_quant")])
def test_fp8_storage_and_the_config_must_agree(make_config, fp8_deepseek, tmp_path, capsys, model, key):
    folder, _ = fp8_deepseek
    assert main(["--config", _config(make_config, folder, tmp_path, **model), "--dry-run"]) == 2
    assert key in capsys.readouterr().err


def test_fp8_dtype_on_a_float_checkpoint_is_refused(make_config, tiny_dir, tmp_path, capsys):
    cfg = make_config({"model": {"torch_dtype": "torch.float8_e4m3fn", "block_wise_quant": True}})
    assert main(["--config", cfg, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.torch_dtype" in err and "no quantization_config" in err


def test_block_wise_quant_needs_the_fp8_dtype(make_config, capsys):
    assert main(["--config", make_config({"model": {"block_wise_quant": True}}), "--dry-run"]) == 2
    assert "block_wise_quant" in capsys.readouterr().err


W4G = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 16, "pack_version": "gemm_pack"}
W8A8 = ({"bit": 8, "symmetric": True, "granularity": "per_channel"},
        {"bit": 8, "symmetric": True, "granularity": "per_token"})
# LLMC's configs/quantization/deepseekv3 recipes, written out here (group 64 -> 16 for the tiny widths)
DSV3_RECIPES = {
    "rtn_w_only_dsv3": ({"method": "RTN", "weight": W4G}, {"save_autoawq": True}),
    "awq_w_only_dsv3": ({"method": "Awq", "weight": W4G,
                         "special": {"trans": True, "trans_version": "v2", "weight_clip": True, "save_mem": False}},
                        {"save_autoawq": True}),
    "rtn_w_a_dsv3": ({"method": "RTN", "weight": W8A8[0], "act": W8A8[1]}, {"save_vllm": True}),
    "smoothquant_w_a_dsv3": ({"method": "SmoothQuant", "weight": W8A8[0], "act": W8A8[1], "special": {"alpha": 0.8}},
                             {"save_vllm": True}),
}


@pytest.mark.parametrize("recipe", list(DSV3_RECIPES))
def test_llmc_deepseek_v3_recipes_run_on_the_fp8_checkpoint(make_config, fp8_deepseek, tmp_path, recipe):
    folder, _ = fp8_deepseek
    quant, save = DSV3_RECIPES[recipe]
    cfg = make_config({"model": {"path": str(folder), "type": "DeepseekV3", "torch_dtype": "torch.float8_e4m3fn",
                                 "block_wise_quant": True, "tokenizer_mode": "fast"},
                       "calib": {"name": "wikitext2", "path": None, "n_samples": 4, "seq_len": 32, "bs": -1,
                                 "preproc": "wikitext2_gptq"},
                       "eval": {"eval_pos": ["fake_quant"]},
                       "quant": quant, "save": {**save, "save_path": str(tmp_path / "out")}})
    import yaml
    raw = yaml.safe_load(open(cfg))
    raw["calib"]["path"] = raw["eval"]["path"].replace("wiki.test.raw", "wiki.valid.tokens")
    raw["quant"] = quant  # exactly the recipe's section (make_config merges into an RTN default)
    Path(cfg).write_text(yaml.safe_dump(raw))
    assert main(["--config", cfg, "--dry-run"]) == 0
    assert main(["--config", cfg]) == 0
    folder_name = "autoawq_quant_model" if "save_autoawq" in save else "vllm_quant_model"
    assert (tmp_path / "out" / folder_name / "config.json").is_file()
