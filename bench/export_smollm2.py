"""Packed exports of SmolLM2-135M (issue: real quantized export): GPTQ and SignRound W4A16 asym g64 written as
AutoAWQ, GPTQ and compressed-tensors checkpoints, and RTN W8A8 (per-token dynamic activations) as compressed-tensors.

For each checkpoint: unpack it with the format's documented layout (the unpackers of
tests/test_export_packed.py, independent of llmc's packers) and compare with the fake-quant weights bit
for bit; load the compressed-tensors folder with transformers on CPU (weights dequantized; input activations
quantized by compressed-tensors with the scheme in the checkpoint's config) and measure its PPL on
the same 40 windows as the run's fake-quant PPL; report the checkpoint sizes against the float one. Where the
GPTQModel venv of tests/test_export_clients_gptqmodel.py exists, GPTQModel loads the GPTQ and AutoAWQ folders
(its CPU kernels, bfloat16 as it picks on CPU): the weights it computes with, in quantization steps from the
fake-quant ones, its logits on the first window and its PPL on the 40.

    python bench/export_smollm2.py [--redo] [--only LABEL ...]   # writes bench/results/export_smollm2.{json,md}
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

from common import DATA, RESULTS, check_only, markdown, run_llmc  # noqa: E402

NAME = "export_smollm2"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
FP8 = ["quant.weight.quant_type=float-quant", "quant.weight.bit=e4m3", "quant.act.quant_type=float-quant",
       "quant.act.bit=e4m3"]
RUNS = {
    "GPTQ W4A16 g64 asym": ("configs/quantization/methods/GPTQ/gptq_w_only.yml",
                            ["save.save_fake=True", "save.save_autoawq=True", "save.save_gptq=True",
                             "save.save_vllm=True"]),
    # learned rounding leaves an ordinary grid: the same three packed formats, checked the same way (50 of the
    # 200 iterations: what is checked is the export of what SignRound learns, not its accuracy)
    "SignRound W4A16 g64 asym (50 iters)": ("configs/quantization/methods/SignRound/signround_w_only.yml",
                                            ["quant.special.iters=50", "save.save_fake=True",
                                             "save.save_autoawq=True", "save.save_gptq=True",
                                             "save.save_vllm=True"]),
    "RTN W8A8 (per-token dynamic)": ("configs/quantization/methods/RTN/rtn_w_a.yml",
                                     ["save.save_fake=True", "save.save_vllm=True"]),
    "RTN FP8 W8A8 (e4m3 per-channel, per-token dynamic)": ("configs/quantization/methods/RTN/rtn_w_a.yml", FP8 + [
        "save.save_fake=True", "save.save_vllm=True"]),
    # DeepSeek's block-wise FP8 at the block SmolLM2's 576 columns divide (64; DeepSeek ships 128)
    "RTN FP8 block 64 (e4m3 64 x 64 weights, per-group 64 dynamic acts)": (
        "configs/quantization/methods/RTN/rtn_w_a.yml", FP8 + [
            "quant.weight.granularity=per_block", "quant.weight.block_size=64", "quant.act.granularity=per_group",
            "quant.act.group_size=64", "save.save_fake=True", "save.save_vllm=True"]),
}


def mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20


def linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k[:-len(".weight")]: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if ".layers." in k and k.endswith("_proj.weight")}


def packed_equal(folder: Path, ref: dict[str, torch.Tensor], fmt: str, bits: int, group: int) -> bool:
    from test_export_packed import awq_dequant, gptq_dequant

    t = load_file(str(folder / "model.safetensors"))
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    for name, w in ref.items():
        if fmt == "awq":
            got = awq_dequant({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, group)[0]
        else:
            got = gptq_dequant({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits,
                               qc["checkpoint_format"])[0]
        if not torch.equal(got, w.float()):
            print(f"{fmt}: {name} differs (max {(got - w.float()).abs().max():.3g})")
            return False
    return True


def compressed_tensors_check(folder: Path, ref: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Weights bit-exact after transformers' decompression, and the PPL of the loaded model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from llmc.engine.context import RunContext
    from llmc.evaluation.ppl import perplexity
    from llmc.models import adapter_class

    # The dense load, so that every layer's weight can be read back before a forward (the plain load, which
    # asymmetric packed folders turn into this one themselves, is tests/test_export_clients.py's).
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32).eval()
    weights = {n: m.weight.detach() for n, m in model.named_modules() if n in ref}
    exact = all(torch.equal(weights[n].float(), w.float()) for n, w in ref.items())
    quantize_input_activations(model, folder, set(ref))
    windows = ppl_windows(folder)
    adapter = adapter_class(model.config.model_type, None)(model)
    with torch.no_grad():
        ppl = perplexity(model, adapter, windows, 1, RunContext(), False, "compressed-tensors")
    return exact, ppl


def ppl_windows(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from llmc.data import load_eval_text
    from llmc.evaluation.ppl import eval_windows

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return eval_windows(tokenizer, load_eval_text("wikitext2", f"{DATA}/wikitext2/wiki.test.raw", False), 2048, 40)


def gptqmodel_check(save: Path, folders: dict[str, str]) -> dict:
    """GPTQModel on the GPTQ and AutoAWQ folders, in the venv of tests/test_export_clients_gptqmodel.py
    ({} when it is absent): weights in steps of the checkpoint's own scales, logits on the first window
    against the float32 fake-quant model, PPL on the 40 windows."""
    import os
    import subprocess

    from safetensors.torch import save_file
    from test_export_clients_gptqmodel import VENV_PYTHON

    from llmc.export.save import load_fake_quant

    if not Path(VENV_PYTHON).exists():
        print(f"no GPTQModel venv at {VENV_PYTHON}: GPTQModel not checked")
        return {}
    fake = load_fake_quant(save / "fake_quant_model")
    windows = ppl_windows(save / "fake_quant_model")
    with torch.no_grad():
        logits = fake(windows[:1]).logits.float()
    weights = linear_weights(save / "fake_quant_model")
    cases = []
    for fmt, folder in folders.items():
        t = load_file(str(save / folder / "model.safetensors"))
        ref = {"ids": windows[:1].clone(), "logits": logits, "windows": windows.contiguous()}
        for name, w in weights.items():
            scales = t[f"{name}.scales"].float()                      # [groups, out]
            if f"{name}.g_idx" in t:
                rows = t[f"{name}.g_idx"].long()
            else:
                rows = torch.arange(w.shape[1]) // (w.shape[1] // scales.shape[0])
            ref[f"w.{name}"], ref[f"s.{name}"] = w.float().contiguous(), scales[rows].t().contiguous()
        ref_file = save / f"{folder}.client_ref.safetensors"
        save_file(ref, str(ref_file))
        cases.append({"name": folder, "folder": str(save / folder), "ref": str(ref_file), "clients": ["gptqmodel"]})
    (save / "clients.json").write_text(json.dumps({"dtype": "bfloat16", "cases": cases}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    subprocess.run([VENV_PYTHON, str(ROOT / "tests" / "test_export_clients_gptqmodel.py"), str(save / "clients.json"),
                    str(save / "clients_out.json")], env=env, check=True)
    out = json.loads((save / "clients_out.json").read_text())
    return {key.split("/")[0]: {**r, "versions": out["versions"]} for key, r in out["results"].items()}


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
    packed = {fmt: folder for fmt, folder in (("awq", "autoawq_quant_model"), ("gptq", "gptq_quant_model"))
              if (save / folder).exists()}
    for fmt, folder in packed.items():
        row["formats"][folder] = {"mb": mb(save / folder),
                                  "bit_exact": packed_equal(save / folder, ref, fmt, wcfg["bit"], wcfg["group_size"])}
    for folder, client in (gptqmodel_check(save, packed) if packed else {}).items():
        row["formats"][folder]["gptqmodel"] = client
    exact, ppl = compressed_tensors_check(save / "vllm_quant_model", ref)
    row["formats"]["vllm_quant_model"] = {"mb": mb(save / "vllm_quant_model"), "bit_exact": exact, "reload_ppl": ppl,
                                          "ppl_vs_fake_pct": 100 * (ppl / fake_ppl - 1)}
    return row


def render(rows: dict) -> str:
    table, versions = [], ""
    for label, r in rows.items():
        for folder, f in r["formats"].items():
            g = f.get("gptqmodel", {})
            versions = versions or ", ".join(f"{k} {v}" for k, v in g.get("versions", {}).items())
            client = ""
            if g:
                client = g["error"] if "error" in g else (
                    f"{g['ppl']:.3f} ({100 * (g['ppl'] / r['fake_quant_ppl'] - 1):+.3f}%); "
                    f"weights within {g['weight_err_steps']:.3f} step; logits {g['logits_err']:.3f}")
            table.append([label, folder, f"{f['mb']:.1f}", f"{r['float_mb']:.1f}", f"{r['float_mb'] / f['mb']:.2f}x",
                          "yes" if f["bit_exact"] else "NO", f"{r['fake_quant_ppl']:.3f}",
                          f"{f['reload_ppl']:.3f} ({f['ppl_vs_fake_pct']:+.3f}%)" if "reload_ppl" in f else "", client])
    return ("SmolLM2-135M-Instruct packed exports (`bench/export_smollm2.py`); PPL on wiki.test.raw first 40 x 2048, "
            "float32 eval; sizes of the .safetensors files (embeddings and lm_head stay float32). The reload dequantizes "
            "the weights (transformers on CPU) and quantizes each linear's input with the checkpoint's own "
            "input_activations scheme through compressed-tensors, so W8A8 is compared with W8A8. GPTQModel: the "
            "checkpoint loaded by GPTQModel on CPU in bfloat16 (its default there), PPL on the same windows, the largest "
            "weight error in quantization steps, the largest logit error on the first window against the float32 "
            f"fake-quant model{f' ({versions})' if versions else ''}\n\n"
            + markdown(["run", "checkpoint", "MB", "float MB", "smaller", "bit-exact vs fake quant",
                        "fake-quant PPL", "reloaded PPL (transformers, CPU)", "GPTQModel (CPU, bfloat16)"], table))


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*", help="rerun these rows (e.g. once the GPTQModel venv exists)")
    a = parser.parse_args()
    check_only(a.only, RUNS)
    path = RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text()) if path.exists() and not a.redo else {}
    for label, (config, overrides) in RUNS.items():
        if (a.only and label not in a.only) or (label in rows and not a.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows[label] = measure(label, config, overrides, Path(tmp))
        path.write_text(json.dumps(rows, indent=2))
        (RESULTS / f"{NAME}.md").write_text(render(rows) + "\n")
    print(render(rows))
