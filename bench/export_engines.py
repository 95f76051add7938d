"""Engine exports of SmolLM2-135M (issues 28/29): GGUF, TensorRT-LLM, MLC-LLM and LightLLM checkpoints of RTN
W4 runs, each checked against the run's fake-quant weights and, where a loader runs on CPU, reloaded and
evaluated on the same 40 x 2048 windows as the run's fake-quant PPL.

- GGUF Q4_1 (RTN W4 g32 asymmetric, configs/quantization/backend/gguf/rtn_w4a16_q4_1.yml): every tensor read
  back with gguf's reader and dequantizer (tests/test_export_engines.py), compared bit for bit; the file
  loaded by transformers (`gguf_file=`) and its PPL measured.
- TensorRT-LLM W4A16_AWQ, MLC-LLM (AutoAWQ GEMM) and LightLLM (compressed-tensors) of one RTN W4 g64
  symmetric run (configs/quantization/backend/lightllm/rtn_w4a16.yml): the first two unpacked with their
  documented layouts (the tests' unpackers), the third reloaded by transformers and its PPL measured.

    python bench/export_engines.py [--redo]   # writes bench/results/export_engines.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common import RESULTS, markdown, run_llmc  # noqa: E402
from export_smollm2 import compressed_tensors_check, linear_weights, mb, ppl_windows  # noqa: E402

NAME = "export_engines"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32",
        "save.save_fake=True"]
RUNS = {
    "RTN W4 g32 asym": ("configs/quantization/backend/gguf/rtn_w4a16_q4_1.yml", []),
    "RTN W4 g64 sym": ("configs/quantization/backend/lightllm/rtn_w4a16.yml",
                       ["save.save_trtllm=True", "save.save_mlcllm=True"]),
    "RTN W8A8 static, KV int8 static per-head": ("configs/quantization/methods/KVQuant/"
                                                 "rtn_w_a_perhead_static_naive_quant_kv.yml", []),
}


def gguf_check(save: Path, ref: dict[str, torch.Tensor]) -> dict:
    from test_export_engines import gguf_name, gguf_weights
    from transformers import AutoModelForCausalLM

    from llmc.engine.context import RunContext
    from llmc.evaluation.ppl import perplexity
    from llmc.models import adapter_class

    folder = save / "gguf_quant_model"
    weights = gguf_weights(folder / "model.gguf")
    exact = all(torch.equal(weights[gguf_name(n)][0], w.float()) for n, w in ref.items())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
    adapter = adapter_class(model.config.model_type, None)(model)
    with torch.no_grad():
        ppl = perplexity(model, adapter, ppl_windows(save / "fake_quant_model"), 1, RunContext(), False, "gguf")
    return {"mb": (folder / "model.gguf").stat().st_size / 2 ** 20, "bit_exact": exact, "reload_ppl": ppl}


def trtllm_check(save: Path, ref: dict[str, torch.Tensor]) -> dict:
    from test_export_engines import TRT_OF, trt_dequant, trt_reassemble
    from transformers import AutoConfig

    folder = save / "trtllm_quant_model"
    cfg = json.loads((folder / "config.json").read_text())
    merged = trt_reassemble(folder, AutoConfig.from_pretrained(save / "fake_quant_model"),
                            cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"])
    group = cfg["quantization"]["group_size"]
    exact = True
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        pairs = [(f"transformer.layers.{i}.attention.qkv",
                  torch.cat([ref[f"{p}.self_attn.{x}_proj"] for x in "qkv"]))]
        pairs += [(f"transformer.layers.{i}.{trt}", ref[f"{p}.{hf}"]) for hf, trt in TRT_OF.items()]
        for trt, w in pairs:
            got = trt_dequant({k: merged[f"{trt}.{k}"] for k in ("weight", "weights_scaling_factor")}, group)
            exact &= torch.equal(got, w.float())
    return {"mb": sum(f.stat().st_size for f in folder.glob("rank*.safetensors")) / 2 ** 20, "bit_exact": exact}


def mlcllm_check(save: Path, ref: dict[str, torch.Tensor], group: int) -> dict:
    from test_export_packed import awq_dequant

    folder = save / "mlcllm_quant_model"
    t = load_file(str(folder / "model.safetensors"))
    exact = all(torch.equal(awq_dequant({k: t[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales")}, group)[0],
                            w.float()) for n, w in ref.items())
    return {"mb": mb(folder), "bit_exact": exact}


def lightllm_kv_check(save: Path, name: str) -> dict:
    """LightLLM's KV calibration file against the static KV ranges the fake-quant model was run with (saved in
    its llmc_act_scales.safetensors): each scale must be that range's absmax / 448 (FP8 e4m3)."""
    from transformers import AutoConfig

    from llmc.export.save import ACT_RECORD, ACT_SCALES

    record = json.loads((save / name).read_text())
    scales = load_file(str(save / "fake_quant_model" / ACT_SCALES))
    cfg = AutoConfig.from_pretrained(save / "fake_quant_model")
    kv = json.loads((save / "fake_quant_model" / ACT_RECORD).read_text())["kvcache"]
    half = (2 ** kv["bit"] - 1) / 2  # symmetric integer grid: the calibrated absmax is half its span
    exact = record["scales_shape"] == [cfg.num_hidden_layers, 2 * cfg.num_key_value_heads]
    for i in range(cfg.num_hidden_layers):
        want = torch.cat([scales[f"model.layers.{i}.self_attn.{x}_scale"].reshape(-1) * half for x in "kv"]) / 448.0
        exact &= torch.allclose(torch.tensor(record["scales"][i]), want.double().float(), rtol=1e-6)
    return {"mb": (save / name).stat().st_size / 2 ** 20, "bit_exact": bool(exact)}


def measure(label: str, config: str, overrides: list[str], work: Path) -> dict:
    save = work / "save"
    res = run_llmc(config, EVAL + overrides, str(save))
    fake_ppl = next(e["ppl"] for e in res["evals"] if e["pos"] == "fake_quant")
    ref = linear_weights(save / "fake_quant_model")
    row = {"fake_quant_ppl": fake_ppl, "float_mb": mb(save / "fake_quant_model"), "formats": {}}
    if (save / "gguf_quant_model").exists():
        row["formats"]["GGUF Q4_1"] = gguf_check(save, ref)
    if (save / "trtllm_quant_model").exists():
        row["formats"]["TensorRT-LLM W4A16_AWQ"] = trtllm_check(save, ref)
    if (save / "mlcllm_quant_model").exists():
        group = res["config"]["quant"]["weight"]["group_size"]
        row["formats"]["MLC-LLM (AutoAWQ GEMM)"] = mlcllm_check(save, ref, group)
    if (save / "lightllm_quant_model").exists():
        exact, ppl = compressed_tensors_check(save / "lightllm_quant_model", ref)
        row["formats"]["LightLLM (compressed-tensors)"] = {"mb": mb(save / "lightllm_quant_model"),
                                                          "bit_exact": exact, "reload_ppl": ppl}
    kv_name = res["config"]["save"].get("lightllm_kv_cache_name") or "kv_cache_calib.json"
    if (save / kv_name).exists():
        row["formats"]["LightLLM KV calib (FP8 scales)"] = lightllm_kv_check(save, kv_name)
    return row


def render(rows: dict) -> str:
    table = []
    for label, r in rows.items():
        for fmt, f in r["formats"].items():
            reload = (f"{f['reload_ppl']:.3f} ({100 * (f['reload_ppl'] / r['fake_quant_ppl'] - 1):+.3f}%)"
                      if "reload_ppl" in f else "not run (CUDA-only engine)")
            size = f"{f['mb']:.1f}" if f["mb"] >= 0.1 else f"{f['mb'] * 1024:.1f} KB"
            table.append([label, fmt, size, f"{r['float_mb']:.1f}", "yes" if f["bit_exact"] else "NO",
                          f"{r['fake_quant_ppl']:.3f}", reload])
    return ("SmolLM2-135M-Instruct engine exports (`bench/export_engines.py`); PPL on wiki.test.raw first 40 x 2048, "
            "float32 eval. Bit-exact: the file unpacked with the format's published layout (GGUF: gguf's reader and "
            "dequantizer) against the fake-quant weights. Reload: transformers on CPU (GGUF through `gguf_file=`, "
            "LightLLM's compressed-tensors folder dequantized). LightLLM KV calib: the JSON's per-head FP8 scales "
            "against the static KV ranges the fake-quant PPL was measured with (MB is the JSON's size)\n\n"
            + markdown(["run", "export", "MB", "float MB", "bit-exact vs fake quant", "fake-quant PPL",
                        "reloaded PPL (transformers, CPU)"], table))


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    a = parser.parse_args()
    path = RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text()) if path.exists() and not a.redo else {}
    for label, (config, overrides) in RUNS.items():
        if label in rows:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows[label] = measure(label, config, overrides, Path(tmp))
        path.write_text(json.dumps(rows, indent=2))
        (RESULTS / f"{NAME}.md").write_text(render(rows) + "\n")
    print(render(rows))
