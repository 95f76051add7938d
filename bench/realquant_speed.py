"""Real-quant speed (issue 29): llmc's packed W4 checkpoints loaded by the engine that runs them on this
machine, against the float model: prefill and decode tokens per second, weight memory and peak RSS, and
the largest logit difference from the float32 fake-quant model (the packed model computes what was scored).

llmc writes, from one RTN W4 run (asym; group 64 on SmolLM2, 128 on the synthetic model): the fake-quant
model (save_fake), GPTQ (save_gptq), AutoAWQ (save_autoawq) and compressed-tensors (save_vllm). Each row
then runs in a process of its own (clean peak RSS); GPTQModel's rows in its venv (LLMC_GPTQMODEL_PYTHON, default
/tmp/gptqm/bin/python; see docs/export.md), because GPTQModel is the CPU engine for these formats:
GPTQ_TORCH dequantizes in every forward, GPTQ_TORCH_FUSED / GPTQ_TORCH_ATEN / AWQ_TORCH_FUSED call
torch's packed int4 CPU matmul (aten._weight_int4pack_mm_for_cpu). transformers reads compressed-tensors
by decompressing to float at load (its row shows that: float speed and memory).

    python bench/realquant_speed.py [--model smollm2|synthetic] [--redo] [--only LABEL ...]
        # writes bench/results/realquant_speed_<model>.{json,md}

smollm2: SmolLM2-135M-Instruct (30 x 576; its 49152 x 576 tied embedding is a third of the weights).
synthetic: a random-weight Llama 4 x 2048 (MLP 5632, GQA 32/8, untied), the width where weight bandwidth
decides decode speed. GGUF has no CPU engine here (llama-cpp-python has no wheel for this machine and no
internet to build it): docs/export.md.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFILL, DECODE, PROMPT, CHECK = 512, 64, 32, 64  # tokens: prefill batch, decode steps, decode prompt, logits check
ROWS = {  # label: (folder, client, backend, dtype)
    "float32 (transformers)": ("fake_quant_model", "transformers", None, "float32"),
    "bfloat16 (transformers)": ("fake_quant_model", "transformers", None, "bfloat16"),
    "compressed-tensors W4 (transformers, decompressed at load)": ("vllm_quant_model", "transformers", None,
                                                                    "bfloat16"),
    "GPTQ W4, GPTQModel GPTQ_TORCH (dequantize per forward)": ("gptq_quant_model", "gptqmodel", "GPTQ_TORCH",
                                                              "bfloat16"),
    "GPTQ W4, GPTQModel GPTQ_TORCH_FUSED (int4 CPU matmul)": ("gptq_quant_model", "gptqmodel", "GPTQ_TORCH_FUSED",
                                                             "bfloat16"),
    "GPTQ W4, GPTQModel GPTQ_TORCH_ATEN (int4 CPU matmul)": ("gptq_quant_model", "gptqmodel", "GPTQ_TORCH_ATEN",
                                                            "bfloat16"),
    "AutoAWQ W4, GPTQModel AWQ_TORCH_FUSED (int4 CPU matmul)": ("autoawq_quant_model", "gptqmodel",
                                                               "AWQ_TORCH_FUSED", "bfloat16"),
}
SYNTHETIC = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=2048)


# ---------------------------------------------------------------- the venv side (one row per process)

def _load(folder: str, client: str, backend: str | None, dtype):
    if client == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(folder, device="cpu", backend=getattr(BACKEND, backend), dtype=dtype).model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=dtype).eval()


def child(spec_file: str, out_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    dtype = getattr(torch, spec["dtype"])
    start = time.perf_counter()
    model = _load(spec["folder"], spec["client"], spec["backend"], dtype)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    linear = next(type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
    with torch.inference_mode():
        logits = model(ids[:, :CHECK]).logits[0].float()
        prefill = []
        for _ in range(4):  # the first is a warm-up
            t = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - t)
        decode = []
        for _ in range(3):  # the first is a warm-up
            out = model(ids[:, :PROMPT], use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(DECODE):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(time.perf_counter() - t)
    torch.save(logits, spec["logits"])
    Path(out_file).write_text(json.dumps({
        "load_s": load_s, "prefill_tok_s": PREFILL / statistics.median(prefill[1:]),
        "decode_tok_s": DECODE / statistics.median(decode[1:]), "weights_mb": weight_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "linear": linear,
        "threads": torch.get_num_threads(), "torch": torch.__version__}))


# ---------------------------------------------------------------- the llmc side

def export(model: str, work: Path) -> Path:
    """One RTN W4 asym run (g64 on SmolLM2, g128 on the synthetic model) writing every format this bench loads
    (reused while its folders exist)."""
    from common import run_llmc

    save = work / "save"
    if all((save / ROWS[label][0]).is_dir() for label in ROWS):
        return save
    group = 64 if model == "smollm2" else 128  # SmolLM2's 576-wide inputs take groups of 64
    overrides = [f"quant.weight.group_size={group}", "eval.eval_pos=[]", "save.save_fake=True", "save.save_gptq=True",
                 "save.save_autoawq=True", "save.save_vllm=True"]
    if model == "synthetic":
        overrides += [f"model.path={synthetic_folder(work / 'float')}", "model.type=Llama",
                      "model.torch_dtype=float32"]
    run_llmc("configs/quantization/methods/RTN/rtn_w_only.yml", overrides, str(save))
    return save


def synthetic_folder(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from tiny import VOCAB, make_tokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False,
                                                             **SYNTHETIC), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    return str(folder)


def measure(label: str, save: Path, venv: str) -> dict:
    folder, client, backend, dtype = ROWS[label]
    key = "".join(c if c.isalnum() else "_" for c in label)
    spec = {"folder": str(save / folder), "client": client, "backend": backend, "dtype": dtype,
            "logits": str(save.parent / f"{key}.logits.pt")}
    spec_file, out_file = save.parent / f"{key}.json", save.parent / f"{key}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    python = venv if client == "gptqmodel" else sys.executable  # transformers rows: llmc's own environment
    proc = subprocess.run([python, __file__, "--child", str(spec_file), str(out_file)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
    out = json.loads(out_file.read_text())
    ref = save.parent / "float32__transformers_.logits.pt"
    if ref.is_file():
        import torch

        out["logit_diff"] = (torch.load(spec["logits"]) - torch.load(ref)).abs().max().item()
    return out


def render(rows: dict, title: str) -> str:
    from common import machine, markdown

    base = rows.get("bfloat16 (transformers)", {})
    table = []
    for label, r in rows.items():
        if "error" in r:
            table.append([label, "", "", "", "", "", "", f"fails: {r['error']}"])
            continue
        diff = f"{r['logit_diff']:.3f}" if "logit_diff" in r else ""
        rel = lambda k: f" ({r[k] / base[k]:.2f}x)" if base.get(k) else ""  # noqa: E731
        table.append([label, f"{r['prefill_tok_s']:.0f}{rel('prefill_tok_s')}",
                      f"{r['decode_tok_s']:.1f}{rel('decode_tok_s')}", f"{r['weights_mb']:.0f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['load_s']:.1f}", diff, r["linear"]])
    header = ["run", f"prefill tok/s (1 x {PREFILL}; vs bf16)", f"decode tok/s ({DECODE} steps; vs bf16)",
              "weights MB", "peak RSS MB", "load s", f"max abs logit diff vs float32 fake quant ({CHECK} tokens)",
              "down_proj module"]
    note = (f"\n\nOne process per row, back to back, {machine()}; torch "
            f"{next((r['torch'] for r in rows.values() if 'torch' in r), '?')}, "
            f"{next((r['threads'] for r in rows.values() if 'threads' in r), '?')} threads.")
    return f"{title}\n\n{markdown(header, table)}{note}\n"


def main() -> None:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, ROOT

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "synthetic"], default="smollm2")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--work", default="/tmp/llmc_realquant_speed")
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    venv = os.environ.get("LLMC_GPTQMODEL_PYTHON", "/tmp/gptqm/bin/python")
    if not Path(venv).exists():
        raise SystemExit(f"no GPTQModel venv at {venv} (docs/export.md has its install line)")
    name = f"realquant_speed_{a.model}"
    json_file = RESULTS / f"{name}.json"
    rows = json.loads(json_file.read_text()) if json_file.is_file() and not a.redo else {}
    save = export(a.model, Path(a.work) / a.model)
    for label in ROWS:
        if (a.only and label not in a.only) or (label in rows and not a.redo and not a.only):
            continue
        print(f"measuring {label} ...", flush=True)
        rows[label] = measure(label, save, venv)
        json_file.write_text(json.dumps(rows, indent=1))
    what = ("SmolLM2-135M-Instruct" if a.model == "smollm2" else
            f"Synthetic Llama {SYNTHETIC['num_hidden_layers']} x {SYNTHETIC['hidden_size']} (random weights)")
    title = (f"{what}, RTN W4 asym {'g64' if a.model == 'smollm2' else 'g128'} packed checkpoints loaded by their CPU engine (`bench/realquant_speed.py`): "
             f"prefill = one forward of {PREFILL} tokens, decode = {DECODE} single-token steps through the KV "
             f"cache after a {PROMPT}-token prompt (medians of 3 and 2 after a warm-up)")
    (RESULTS / f"{name}.md").write_text(render(rows, title))
    print(render(rows, title))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
