"""eval_pos `packed`: every packed checkpoint the run wrote is reloaded through the client its users load
it with and scored on the same windows as the fake-quant model; a score further from the fake-quant one
than the format's tolerance fails the run.

Clients: compressed-tensors folders (save_vllm, save_sgl, save_lightllm) load in this process with
`AutoModelForCausalLM.from_pretrained` (the weights dequantize to the fake-quant weights exactly; activation
schemes run through compressed-tensors), and so does the GGUF file (transformers' gguf reader dequantizes
it). GPTQ and AutoAWQ folders (save_gptq, save_autoawq, save_mlcllm) load with transformers in the GPTQModel
venv of tests/test_export_clients_gptqmodel.py (LLMC_GPTQMODEL_PYTHON, default /tmp/gptqm/bin/python), whose
CPU kernels compute in float16; the child is llmc/evaluation/packed_client.py. TensorRT-LLM checkpoints
have no client on a CPU machine (trtllm-build needs CUDA): they are left out with a log line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from loguru import logger

from llmc.errors import ConfigError, UserError

POSITION = "packed"
CT_KEYS = ("save_vllm", "save_sgl", "save_lightllm", "save_gguf")
VENV_KEYS = ("save_gptq", "save_autoawq", "save_mlcllm")
NO_CLIENT = {"save_trtllm": "TensorRT-LLM engines are built by trtllm-build on a CUDA GPU"}
# Relative PPL tolerance. compressed-tensors reloads compute in float32 with the fake-quant weights bit for
# bit, so only summation order differs (measured +0.000% on SmolLM2). GPTQ/AutoAWQ clients run float16 or
# bfloat16 CPU kernels (measured +0.16% on SmolLM2, bench/results/export_smollm2.md).
TOLERANCE = {"save_vllm": 1e-3, "save_sgl": 1e-3, "save_lightllm": 1e-3, "save_gguf": 1e-3, "save_gptq": 1e-2,
             "save_autoawq": 1e-2, "save_mlcllm": 1e-2}
LOW_PRECISION_TOLERANCE = 2e-2  # fake_quant evaluated under a bfloat16/float16 compute_dtype
CLIENT_TIMEOUT_S = 3600


def client_python() -> str:
    return os.environ.get("LLMC_GPTQMODEL_PYTHON", "/tmp/gptqm/bin/python")


def check(config) -> None:
    """Config errors of eval_pos `packed`, before any weight loads."""
    wanted = [(i, ev) for i, ev in enumerate(config.eval) if POSITION in ev.eval_pos]
    if not wanted:
        return
    formats = [k for k in CT_KEYS + VENV_KEYS if getattr(config.save, k)]
    for i, ev in wanted:
        key = "eval.eval_pos" if len(config.eval) == 1 else f"eval.{i}.eval_pos"
        if ev.type != "ppl":
            raise ConfigError(key, f"{POSITION} with type {ev.type}: packed checkpoints are scored by perplexity "
                              "(type ppl)")
        if "fake_quant" not in ev.eval_pos:
            raise ConfigError(key, f"{ev.eval_pos}: {POSITION} is compared with the fake-quant score; add fake_quant")
        if not formats:
            raise ConfigError(key, f"{POSITION} evaluates the packed exports the run writes, and none is set: set "
                              f"one of save.{', save.'.join(CT_KEYS + VENV_KEYS)}")
    if any(k in formats for k in CT_KEYS):
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise ConfigError(key, f"{POSITION} with save_vllm/save_sgl reloads through transformers + "
                              "compressed-tensors, which is not installed (pip install compressed-tensors)") from None
    venv = [k for k in formats if k in VENV_KEYS]
    if venv and not Path(client_python()).exists():
        raise ConfigError(key, f"{POSITION} with {'/'.join(venv)} reloads through GPTQModel's transformers loader "
                          f"in a venv of its own, and {client_python()} does not exist: create it (python -m venv "
                          "/tmp/gptqm && /tmp/gptqm/bin/pip install torch==2.13.0 gptqmodel optimum) or set "
                          "LLMC_GPTQMODEL_PYTHON")


def _nll_ppl(model, windows: torch.Tensor, bs: int, device) -> float:
    """The perplexity llmc.evaluation.ppl computes: exp of the mean over windows of each window's mean NLL."""
    nlls = []
    with torch.no_grad():
        for s in range(0, windows.shape[0], bs):
            ids = windows[s:s + bs].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
            nlls.append(nll.cpu())
    return torch.cat(nlls).mean().exp().item()


def _transformers_ppl(folder: Path, windows: torch.Tensor, bs: int, device) -> float:
    from transformers import AutoModelForCausalLM

    gguf = sorted(folder.glob("*.gguf"))
    extra = {"gguf_file": gguf[0].name} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).to(device).eval()
    try:
        return _nll_ppl(model, windows, bs, device)
    finally:
        del model


def _venv_ppl(folder: Path, windows: torch.Tensor, bs: int) -> float:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "windows.safetensors", Path(tmp) / "out.json"
        save_file({"windows": windows.contiguous()}, str(data))
        script = Path(__file__).with_name("packed_client.py")
        # -P: the script's folder (llmc/evaluation, with a module named lm_eval) stays off sys.path
        run = subprocess.run([client_python(), "-P", str(script), str(folder), str(data), str(bs), str(out)],
                             capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
        if run.returncode != 0:
            raise UserError(f"eval {POSITION}: {client_python()} could not evaluate {folder}: {run.stderr.strip()[-1500:]}")
        return json.loads(out.read_text())["ppl"]


def evaluate(config, exports: list, out: Path, windows_cache: dict, evals: list[dict], ctx) -> tuple[list, list]:
    """Rows for the summary (position `packed save_<fmt>`) and the mismatch messages (empty when all agree)."""
    rows, failures = [], []
    for i, ev in enumerate(config.eval):
        if POSITION not in ev.eval_pos:
            continue
        for fmt in exports:
            if fmt.key in NO_CLIENT:
                logger.info(f"eval {POSITION}: {fmt.key} left out: {NO_CLIENT[fmt.key]}; its files are checked against "
                            "the fake-quant weights by tests/test_export_engines.py")
                continue
            for name in ev.name:
                windows = windows_cache[(i, name)]
                folder = out / fmt.folder
                with ctx.timed(f"eval {POSITION} {fmt.key} {name}"):
                    if fmt.key in VENV_KEYS:
                        client, ppl = "transformers (GPTQModel venv)", _venv_ppl(folder, windows, ev.bs)
                    else:
                        client, ppl = "transformers", _transformers_ppl(folder, windows, ev.bs, ctx.device)
                fake = next(e["ppl"] for e in evals if e["pos"] == "fake_quant" and e["dataset"] == name
                            and e["windows"] == windows.shape[0] and e["seq_len"] == ev.seq_len)
                low = (ev.compute_dtype or config.model.compute_dtype) != "float32"
                tol = max(TOLERANCE[fmt.key], LOW_PRECISION_TOLERANCE) if low else TOLERANCE[fmt.key]
                diff = ppl / fake - 1
                logger.info(f"{POSITION} {fmt.key} {name}: PPL {ppl:.4f} ({client}), fake_quant {fake:.4f}, "
                            f"{100 * diff:+.3f}% (tolerance {100 * tol:g}%)")
                rows.append({"pos": f"{POSITION} {fmt.key}", "dataset": name, "ppl": ppl, "windows": windows.shape[0],
                             "seq_len": ev.seq_len, "client": client, "vs_fake_quant": diff, "tolerance": tol})
                if not abs(diff) <= tol:  # NaN fails too
                    failures.append(f"{fmt.key} ({folder}) reloaded by {client} scores PPL {ppl:.4f} on {name}, the "
                                    f"fake-quant model {fake:.4f}: {100 * diff:+.3f}% exceeds the tolerance "
                                    f"{100 * tol:g}%")
    return rows, failures
