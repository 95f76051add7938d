"""Packed exports of SmolLM2-135M (issue: real quantized export): GPTQ W4A16 asym g64 written as AutoAWQ,
GPTQ and compressed-tensors checkpoints, and RTN W8A8 (per-token dynamic activations) as compressed-tensors.

For each checkpoint: unpack it with the format's documented layout (the unpackers of
tests/test_export_packed.py, independent of llmc's packers) and compare with the fake-quant weights bit
for bit; load the compressed-tensors folder with transformers on CPU (weights dequantized; input activations
quantized by compressed-tensors with the scheme in the checkpoint's config) and measure its PPL on the same 40
windows as the run's fake-quant PPL; report the checkpoint sizes against the float one.

    python bench/export_smollm2.py [--redo]   # writes bench/results/export_smollm2.{json,md}
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

from common import DATA, RESULTS, markdown, run_llmc  # noqa: E402

NAME = "export_smollm2"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
RUNS = {
    "GPTQ W4A16 g64 asym": ("configs/quantization/methods/GPTQ/gptq_w_only.yml",
                            ["save.save_fake=True", "save.save_autoawq=True", "save.save_gptq=True",
                             "save.save_vllm=True"]),
    "RTN W8A8 (per-token dynamic)": ("configs/quantization/methods/RTN/rtn_w_a.yml",
                                     ["save.save_fake=True", "save.save_vllm=True"]),
}


def mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20


def linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k[:-len(".weight")]: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if ".layers." in k and k.endswith("_proj.weight")}


def packed_equal(folder: Path, ref: dict[str, torch.Tensor], fmt: str, bits: int, group: int) -> bool:
    from test_export_packed import awq_dequant, gptq_dequant

    t = load_file(str(folder / "model.safetensors"))
    for name, w in ref.items():
        if fmt == "awq":
            got = awq_dequant({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, group)[0]
        else:
            got = gptq_dequant({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits)[0]
        if not torch.equal(got, w.float()):
            print(f"{fmt}: {name} differs (max {(got - w.float()).abs().max():.3g})")
            return False
    return True


def compressed_tensors_check(folder: Path, ref: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Weights bit-exact after transformers' decompression, and the PPL of the loaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from llmc.data import load_eval_text
    from llmc.engine.context import RunContext
    from llmc.evaluation.ppl import eval_windows, perplexity
    from llmc.models import adapter_class

    # Asymmetric pack-quantized folders need the dequantizing load in transformers 5 (docs/export.md).
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32).eval()
    weights = {n: m.weight.detach() for n, m in model.named_modules() if n in ref}
    exact = all(torch.equal(weights[n].float(), w.float()) for n, w in ref.items())
    quantize_input_activations(model, folder, set(ref))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = eval_windows(tokenizer, load_eval_text("wikitext2", f"{DATA}/wikitext2/wiki.test.raw", False), 2048, 40)
    adapter = adapter_class(model.config.model_type, None)(model)
    with torch.no_grad():
        ppl = perplexity(model, adapter, windows, 1, RunContext(), False, "compressed-tensors")
    return exact, ppl


def quantize_input_activations(model, folder: Path, linears: set[str]) -> int:
    """The dequantizing CPU load runs activations in float; put back the checkpoint's own input-activation
    scheme (as an engine would run it) with compressed-tensors' fake quantization, so a W8A8 reload is
    compared with W8A8 fake quant. Returns the number of linears hooked."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import compute_dynamic_scales_and_zp, fake_quantize

    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    schemes = [QuantizationArgs(**g["input_activations"]) for g in groups if g.get("input_activations")]
    if not schemes:
        return 0
    args = schemes[0]
    if not args.dynamic or len(schemes) > 1:
        raise SystemExit(f"{folder}: only one dynamic input-activation scheme is handled here, got {schemes}")

    def hook(module, inputs):
        x = inputs[0]
        scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=module)
        return (fake_quantize(x=x, scale=scale, zero_point=zero, args=args),) + tuple(inputs[1:])

    hooked = [m.register_forward_pre_hook(hook) for n, m in model.named_modules() if n in linears]
    return len(hooked)


def measure(label: str, config: str, overrides: list[str], work: Path) -> dict:
    save = work / label.split()[0].lower()
    res = run_llmc(config, EVAL + overrides, str(save))
    fake_ppl = next(e["ppl"] for e in res["evals"] if e["pos"] == "fake_quant")
    ref = linear_weights(save / "fake_quant_model")
    wcfg = res["config"]["quant"]["weight"]
    row = {"fake_quant_ppl": fake_ppl, "quantize_s": res["timings"].get("quantize"),
           "float_mb": mb(save / "fake_quant_model"), "formats": {}}
    for fmt, folder in (("awq", "autoawq_quant_model"), ("gptq", "gptq_quant_model")):
        if (save / folder).exists():
            row["formats"][folder] = {"mb": mb(save / folder),
                                      "bit_exact": packed_equal(save / folder, ref, fmt, wcfg["bit"], wcfg["group_size"])}
    exact, ppl = compressed_tensors_check(save / "vllm_quant_model", ref)
    row["formats"]["vllm_quant_model"] = {"mb": mb(save / "vllm_quant_model"), "bit_exact": exact, "reload_ppl": ppl,
                                          "ppl_vs_fake_pct": 100 * (ppl / fake_ppl - 1)}
    return row


def render(rows: dict) -> str:
    table = []
    for label, r in rows.items():
        for folder, f in r["formats"].items():
            table.append([label, folder, f"{f['mb']:.1f}", f"{r['float_mb']:.1f}", f"{r['float_mb'] / f['mb']:.2f}x",
                          "yes" if f["bit_exact"] else "NO", f"{r['fake_quant_ppl']:.3f}",
                          f"{f['reload_ppl']:.3f} ({f['ppl_vs_fake_pct']:+.3f}%)" if "reload_ppl" in f else ""])
    return ("SmolLM2-135M-Instruct packed exports (`bench/export_smollm2.py`); PPL on wiki.test.raw first 40 x 2048, "
            "float32 eval; sizes of the .safetensors files (embeddings and lm_head stay float32). The reload dequantizes "
            "the weights (transformers on CPU) and quantizes each linear's input with the checkpoint's own "
            "input_activations scheme through compressed-tensors, so W8A8 is compared with W8A8\n\n"
            + markdown(["run", "checkpoint", "MB", "float MB", "smaller", "bit-exact vs fake quant",
                        "fake-quant PPL", "reloaded PPL (transformers, CPU)"], table))


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
