"""Engine exports on tiny models: GGUF (read back with gguf's reader and dequantizer, and loaded by
transformers' GGUF path), TensorRT-LLM checkpoints (unpacked here following its documented layout, ranks
reassembled), and LLMC's save_mlcllm / save_lightllm folders (AutoAWQ and compressed-tensors layouts)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from llmc.cli import main
from llmc.errors import UserError
from llmc.export import gguf_format, trtllm
from llmc.export.save import load_fake_quant
from llmc.models.adapter import adapter_class, set_module
from llmc.quant.fake_linear import QuantLinear, quant_linears
from llmc.quant.quantizer import QuantArgs
from test_export_packed import awq_dequant, ct_load, quantized, read
from tiny import make_tokenizer

GGUF_CASES = {"Q4_0": (4, True, "float16"), "Q4_1": (4, False, "float16_7bit"), "Q8_0": (8, True, "float16")}


def gguf_args(kind):
    bit, sym, scale_dtype = GGUF_CASES[kind]
    return QuantArgs(bit=bit, symmetric=sym, granularity="per_group", group_size=32, scale_dtype=scale_dtype)


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row order: per head, rows (0, half, 1, half+1, ...) back to (0, 1, ..., half, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(path):
    """{GGUF name: (float32 weights as HF orders rows, type name)} through gguf's reader and dequantizer."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = unpermute(w, heads if ".attn_q." in t.name else kv_heads)
        out[t.name] = (torch.from_numpy(np.array(w)), t.tensor_type.name)
    return out


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    i, rel = hf.split(".")[2], ".".join(hf.split(".")[3:])
    return f"blk.{i}.{HF_TO_GGUF[rel]}.weight"


def fake_logits(model, ids):
    from llmc.export.save import plain_linears

    with plain_linears(model, fake=True), torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("kind", list(GGUF_CASES))
def test_gguf_reads_back_as_the_fake_quant_weights(tmp_path, kind):
    model = quantized(gguf_args(kind))
    gguf_format.save(model, make_tokenizer(), tmp_path / "g")
    weights = gguf_weights(tmp_path / "g" / "model.gguf")
    for name, q in quant_linears(model):
        w, qtype = weights[gguf_name(name)]
        assert qtype == kind
        assert torch.equal(w, q.fake_weight().detach()), name  # bit for bit
    emb, qtype = weights["token_embd.weight"]
    assert qtype == "F32" and torch.equal(emb, model.model.embed_tokens.weight.detach())
    assert "output.weight" not in weights  # tied head: llama.cpp and transformers tie it to token_embd


def test_gguf_q4_1_bytes_follow_ggml_block_layout(tmp_path):
    """One block decoded by hand from GGML's block_q4_1 (fp16 d, fp16 m, 16 bytes: q[j] low, q[j+16] high)."""
    from gguf import GGUFReader

    model = quantized(gguf_args("Q4_1"))
    gguf_format.save(model, make_tokenizer(), tmp_path / "g")
    t = next(t for t in GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
    raw = np.array(t.data).reshape(-1)[:20]
    d, m = raw[0:2].view(np.float16)[0], raw[2:4].view(np.float16)[0]
    q = np.concatenate([raw[4:20] & 0xF, raw[4:20] >> 4]).astype(np.float32)
    block = torch.from_numpy(q * np.float32(d) + np.float32(m))
    down = dict(quant_linears(model))["model.layers.0.mlp.down_proj"]
    assert torch.equal(block, down.fake_weight().detach()[0, :32])


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0"])
def test_gguf_loads_in_transformers_with_the_fake_quant_logits(tmp_path, kind):
    model = quantized(gguf_args(kind))
    gguf_format.save(model, make_tokenizer(), tmp_path / "g")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file="model.gguf",
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fake_logits(model, ids))
    from transformers import AutoTokenizer  # the file carries the tokenizer too

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "g"), gguf_file="model.gguf")
    text = "Quantization maps floating point weights to a small grid."
    assert tok(text)["input_ids"] == make_tokenizer()(text)["input_ids"] and tok.eos_token == "<eos>"


def test_gguf_refuses_scales_that_float16_cannot_hold(tmp_path):
    # float16 scales (as save_autoawq's grid): Q4_1's block minima (zero+8)·scale are then not all float16
    model = quantized(QuantArgs(bit=4, symmetric=False, granularity="per_group", group_size=32), fp16_scales=True)
    with pytest.raises(UserError, match="not a float16"):
        gguf_format.save(model, make_tokenizer(), tmp_path / "g")
    model = quantized(QuantArgs(bit=4, symmetric=True, granularity="per_group", group_size=32))  # float32 scales
    with pytest.raises(UserError, match="not float16 numbers"):
        gguf_format.save(model, make_tokenizer(), tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_cli_gguf_end_to_end(make_config, tmp_path, capsys):
    path = make_config({"save": {"save_gguf": True, "save_fake": True}})  # RTN W4 g32 asymmetric → Q4_1
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    ref = load_fake_quant(out / "fake_quant_model")
    weights = gguf_weights(out / "gguf_quant_model" / "model.gguf")
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w, qtype = weights[gguf_name(name)]
            assert qtype == "Q4_1" and torch.equal(w, m.weight.detach()), name
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "gguf_quant_model"), gguf_file="model.gguf",
                                                  dtype=torch.float32)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("weight, nearest", [
    ({"group_size": 64}, "group_size: 32 (Q4_1)"),
    ({"bit": 8}, "bit: 8, symmetric: True, granularity: per_group, group_size: 32 (Q8_0)"),
    ({"bit": 3, "symmetric": True}, "symmetric: True, granularity: per_group, group_size: 32 (Q4_0)"),
    ({"scale_dtype": "float16"}, "quant.weight.scale_dtype=float16"),
])
def test_gguf_refuses_grids_that_do_not_map_before_loading(make_config, capsys, monkeypatch, weight, nearest):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the export settings were refused")

    monkeypatch.setattr("llmc.run.load_model", no_weights)
    assert main(["--config", make_config({"quant": {"weight": weight}, "save": {"save_gguf": True}})]) == 2
    err = capsys.readouterr().err
    assert "save.save_gguf" in err and nearest in err


def test_gguf_refuses_other_families_before_loading(make_config, capsys, monkeypatch):
    monkeypatch.setattr("llmc.run.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["--config", make_config({"save": {"save_gguf": True}}, family="qwen2")]) == 2
    assert "model family qwen2" in capsys.readouterr().err


def test_cli_gguf_beside_a_float16_format_keeps_both_exact(make_config, tmp_path):
    """Q4_1 wants 7-bit float16 scales, AutoAWQ (MLC-LLM) float16 ones: the run takes the former, both hold it."""
    path = make_config({"save": {"save_gguf": True, "save_mlcllm": True, "save_fake": True}})
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    ref = load_fake_quant(out / "fake_quant_model")
    weights = gguf_weights(out / "gguf_quant_model" / "model.gguf")
    mlc, _ = read(out / "mlcllm_quant_model")
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            assert torch.equal(weights[gguf_name(name)][0], m.weight.detach()), name
            w = awq_dequant({k: mlc[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, 32)[0]
            assert torch.equal(w, m.weight.detach()), name


# ---------------------------------------------------------------- TensorRT-LLM

def unpack_int4x2(packed):
    """TensorRT-LLM's int4x2 read back: byte (j, k) holds rows 2j (low nibble) and 2j+1 (high), signed."""
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0xF, b >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1]).float()


def trt_dequant(t, group):
    codes = unpack_int4x2(t["weight"])
    return codes * t["weights_scaling_factor"].float().repeat_interleave(group, dim=1)


def wide_llama():
    """A Llama wide enough for two tensor-parallel ranks at group 64 (hidden 256, 4 kv heads)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    adapter = adapter_class("llama", None)(model)
    args = QuantArgs(bit=4, symmetric=True, granularity="per_group", group_size=64, scale_dtype="float16")
    for block in adapter.block_list():
        for name in adapter.linear_names():
            q = QuantLinear(block.get_submodule(name), args)
            q.set_weight_qparams()
            set_module(block, name, q)
    return model


def trt_reassemble(folder, cfg, tp, pp):
    """Every rank file merged back into whole tensors: column-parallel rows per rank (qkv per q/k/v part),
    row-parallel (dense, proj) columns per rank, layers per pipeline stage."""
    head = cfg.hidden_size // cfg.num_attention_heads
    qkv_rows = [cfg.num_attention_heads * head, cfg.num_key_value_heads * head, cfg.num_key_value_heads * head]
    per_stage = cfg.num_hidden_layers // pp

    def global_names(rank, tensors):  # each stage numbers its layers from 0; rank = pp_rank * tp + tp_rank
        def rename(k):
            if not k.startswith("transformer.layers."):
                return k
            _, _, i, rest = k.split(".", 3)
            return f"transformer.layers.{int(i) + rank // tp * per_stage}.{rest}"
        return {rename(k): v for k, v in tensors.items()}

    ranks = [global_names(r, load_file(str(folder / f"rank{r}.safetensors"))) for r in range(tp * pp)]
    merged = {}
    for name in sorted(set().union(*ranks)):
        shards = [r[name] for r in ranks if name in r]
        if len(shards) == 1 or name.endswith(("layernorm.weight", "ln_f.weight", "vocab_embedding.weight")):
            merged[name] = shards[0]
        elif ".attention.dense." in name or ".mlp.proj." in name:
            merged[name] = torch.cat(shards, dim=1)
        elif ".attention.qkv." in name:
            div = 2 if name.endswith(".weight") else 1
            parts = [torch.split(s, [n // tp // div for n in qkv_rows]) for s in shards]
            merged[name] = torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
        else:
            merged[name] = torch.cat(shards)
    return merged


TRT_OF = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
          "mlp.down_proj": "mlp.proj"}


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (2, 2)])
def test_trtllm_checkpoint_unpacks_to_the_fake_quant_weights(tmp_path, tp, pp):
    model = wide_llama()
    trtllm.save(model, make_tokenizer(), tmp_path / "t", recipe={}, tp_size=tp, pp_size=pp)
    folder = tmp_path / "t"
    config = json.loads((folder / "config.json").read_text())
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert config["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                                      "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": ["lm_head"]}
    merged = trt_reassemble(folder, model.config, tp, pp)
    layers = dict(quant_linears(model))
    for i in range(2):
        p = f"model.layers.{i}"
        qkv = trt_dequant({k: merged[f"transformer.layers.{i}.attention.qkv.{k}"]
                           for k in ("weight", "weights_scaling_factor")}, 64)
        fake = torch.cat([layers[f"{p}.self_attn.{x}_proj"].fake_weight().detach() for x in "qkv"])
        assert torch.equal(qkv, fake)
        for hf, trt in TRT_OF.items():
            t = {k: merged[f"transformer.layers.{i}.{trt}.{k}"] for k in ("weight", "weights_scaling_factor")}
            w = trt_dequant(t, 64)
            assert torch.equal(w, layers[f"{p}.{hf}"].fake_weight().detach()), hf
        assert merged[f"transformer.layers.{i}.input_layernorm.weight"].dtype == torch.float16
    assert torch.equal(merged["lm_head.weight"], model.lm_head.weight.detach().half())
    assert torch.equal(merged["transformer.vocab_embedding.weight"], model.model.embed_tokens.weight.detach().half())
    if pp == 2:  # layer 0 on stage 0, layer 1 on stage 1 (named 0 there); the head on the last stage only
        first, last = (load_file(str(folder / f"rank{r}.safetensors")) for r in (0, tp * pp - 1))
        assert not any(".layers.1." in k for k in first) and "lm_head.weight" not in first
        assert not any(".layers.1." in k for k in last) and "lm_head.weight" in last
        assert "transformer.vocab_embedding.weight" not in last


def test_cli_trtllm_end_to_end(make_config, tmp_path):
    path = make_config({"quant": {"weight": {"symmetric": True, "group_size": 64}},
                        "save": {"save_trtllm": True, "trtllm_cfg": {"tp_size": 1, "pp_size": 3}, "save_fake": True}})
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    ref = load_fake_quant(out / "fake_quant_model")
    merged = trt_reassemble(out / "trtllm_quant_model", ref.config, 1, 3)
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(TRT_OF)):
            i, rel = name.split(".")[2], ".".join(name.split(".")[3:])
            t = {k: merged[f"transformer.layers.{i}.{TRT_OF[rel]}.{k}"] for k in ("weight", "weights_scaling_factor")}
            assert torch.equal(trt_dequant(t, 64), m.weight.detach()), name  # float16 scales found by the run


@pytest.mark.parametrize("changes, key, text", [
    ({"quant": {"weight": {"group_size": 64}}, "save": {"save_trtllm": True}}, "save.save_trtllm", "symmetric=False"),
    ({"quant": {"weight": {"symmetric": True}}, "save": {"save_trtllm": True}}, "save.save_trtllm", "group_size=32"),
    ({"save": {"trtllm_cfg": {"tp_size": 2}}}, "save", "trtllm_cfg configures save_trtllm"),
    ({"save": {"save_trtllm": True, "trtllm_cfg": {"tp_size": 0}}}, "save.trtllm_cfg.tp_size", ""),
    ({"quant": {"weight": {"symmetric": True, "group_size": 64}},  # the tiny model has 3 layers, 2 kv heads
      "save": {"save_trtllm": True, "trtllm_cfg": {"pp_size": 2}}}, "save.trtllm_cfg", "num_hidden_layers"),
    ({"quant": {"weight": {"symmetric": True, "group_size": 64}},
      "save": {"save_trtllm": True, "trtllm_cfg": {"tp_size": 2}}}, "save.trtllm_cfg", "group_size = 1"),
])
def test_trtllm_refusals_before_loading(make_config, capsys, monkeypatch, changes, key, text):
    monkeypatch.setattr("llmc.run.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["--config", make_config(changes)]) == 2
    err = capsys.readouterr().err
    assert key in err and text in err


# ---------------------------------------------------------------- LLMC's MLC-LLM and LightLLM folders

def test_cli_mlcllm_and_lightllm_folders(make_config, tmp_path):
    path = make_config({"quant": {"weight": {"pack_version": "gemm_pack", "need_pack": True}},
                        "save": {"save_mlcllm": True, "save_lightllm": True, "save_fake": True}})
    assert main(["--config", path]) == 0
    out = tmp_path / "out"
    ref = load_fake_quant(out / "fake_quant_model")
    mlc, cfg = read(out / "mlcllm_quant_model")  # what `mlc_llm convert_weight --source-format awq` reads
    assert cfg["quantization_config"]["version"] == "gemm" and cfg["quantization_config"]["zero_point"]
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = awq_dequant({k: mlc[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, 32)[0]
            assert torch.equal(w, m.weight.detach()), name
    light = ct_load(out / "lightllm_quant_model")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(light(ids).logits, ref(ids).logits)


def test_dry_run_lists_and_refuses_engine_exports(make_config, capsys):
    ok = make_config({"save": {"save_gguf": True, "save_mlcllm": True}})
    assert main(["--config", ok, "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("packed exports:"))
    assert "save_mlcllm -> mlcllm_quant_model/" in line and "save_gguf -> gguf_quant_model/" in line
    bad = make_config({"quant": {"weight": {"group_size": 64}}, "save": {"save_gguf": True}}, name="bad.yml")
    assert main(["--config", bad, "--dry-run"]) == 2
    assert "save.save_gguf" in capsys.readouterr().err
