"""llmc's GPTQ (v1 symmetric, v2 asymmetric) and AutoAWQ exports loaded by the clients that run them on CPU:
GPTQModel itself, and transformers (whose GPTQ and AWQ loading goes through GPTQModel and optimum). The
weights each client computes with (read back by feeding its quantized linears the identity matrix) must be
llmc's fake-quant weights, and its logits the fake-quant model's.

GPTQModel and optimum pin their own dependencies, so they live in a venv of their own (docs/export.md):
    python -m venv /tmp/gptqm && /tmp/gptqm/bin/pip install torch==2.13.0 gptqmodel optimum
named by LLMC_GPTQMODEL_PYTHON (default /tmp/gptqm/bin/python); the tests skip when it is absent. This file
is also the script that venv runs (`python test_export_clients_gptqmodel.py MANIFEST OUT`); that side
imports only torch, safetensors, transformers and gptqmodel.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VENV_PYTHON = os.environ.get("LLMC_GPTQMODEL_PYTHON", "/tmp/gptqm/bin/python")
NO_CLIENT = 3  # the child's exit code when gptqmodel (or optimum) cannot be imported
CLIENTS = ("gptqmodel", "transformers")


# ---------------------------------------------------------------- the venv side

def _load(client: str, folder: str, dtype):
    if client == "gptqmodel":
        from gptqmodel import GPTQModel

        return GPTQModel.load(folder, device="cpu", dtype=dtype).model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=dtype).eval()


def _measure(model, ref: dict, dtype) -> dict:
    """Weights the client computes with, as errors in quantization steps and absolute, and its logits."""
    import torch

    worst_steps = worst_abs = 0.0
    with torch.no_grad():
        for key in [k for k in ref if k.startswith("w.")]:
            name = key[2:]
            module = model.get_submodule(name)
            fake, step = ref[key], ref[f"s.{name}"]
            eye = torch.eye(fake.shape[1], dtype=dtype)
            w = (module(eye) - module(torch.zeros_like(eye[:1]))).float().t()  # exact: one nonzero term each
            err = (w - fake).abs()
            worst_abs = max(worst_abs, err.max().item())
            worst_steps = max(worst_steps, (err / step).max().item())
        logits = model(ref["ids"]).logits.float()
        nll = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1].float(), w[1:])
               for w in ref.get("windows", [])]  # bench/export_smollm2.py: llmc's PPL windows
    out = {"weight_err_steps": worst_steps, "weight_err_abs": worst_abs,
           "logits_err": (logits - ref["logits"]).abs().max().item(),
           "kernel": type(model.get_submodule(next(k[2:] for k in ref if k.startswith("w.")))).__name__}
    if nll:
        out["ppl"] = torch.stack(nll).mean().exp().item()
    return out


def child(manifest: str, out: str) -> int:
    try:
        import gptqmodel
        import optimum  # noqa: F401  (transformers' GPTQ loading needs it)
    except ImportError as err:
        print(f"{sys.executable}: {err}", file=sys.stderr)
        return NO_CLIENT
    import torch
    import transformers
    from importlib.metadata import version
    from safetensors.torch import load_file

    spec = json.loads(Path(manifest).read_text())
    dtype = getattr(torch, spec["dtype"])
    results = {}
    for case in spec["cases"]:
        ref = load_file(case["ref"])
        for client in case.get("clients", CLIENTS):
            try:
                start = time.perf_counter()
                model = _load(client, case["folder"], dtype)
                loaded = time.perf_counter()
                results[f"{case['name']}/{client}"] = {**_measure(model, ref, dtype), "load_s": loaded - start,
                                                       "measure_s": time.perf_counter() - loaded}
            except Exception as err:  # reported per case: one refusal must not hide the others
                results[f"{case['name']}/{client}"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "gptqmodel": gptqmodel.__version__, "optimum": version("optimum")}
    Path(out).write_text(json.dumps({"versions": versions, "dtype": spec["dtype"], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(child(*sys.argv[1:]))


# ---------------------------------------------------------------- the pytest side

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llmc.export import autoawq, gptq_format  # noqa: E402
from llmc.export.packing import group_table  # noqa: E402
from test_export_packed import W, layers, quantized  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(VENV_PYTHON).exists(), reason=(
    f"no GPTQModel venv at {VENV_PYTHON} (set LLMC_GPTQMODEL_PYTHON, or create it: python -m venv /tmp/gptqm && "
    "/tmp/gptqm/bin/pip install torch==2.13.0 gptqmodel optimum)"))

CASES = {  # name: (format module, weight args, GPTQ act order)
    "gptq_w4g32_sym": (gptq_format, W(4, True), False),             # v1
    "gptq_w4g32_asym": (gptq_format, W(4, False), False),           # v2
    "gptq_w4g32_asym_actorder": (gptq_format, W(4, False), True),   # v2, desc_act with g_idx
    "gptq_w3g32_asym": (gptq_format, W(3, False), False),           # v2, 3-bit words straddle
    "gptq_w8_channel_sym": (gptq_format, W(8, True, "per_channel"), False),
    "awq_w4g32_asym": (autoawq, W(4, False), False),
}
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(4))


def reference(model) -> dict[str, torch.Tensor]:
    """What the client must reproduce: llmc's fake-quant weights, the size of one quantization step for
    every weight, and the fake-quant model's float32 logits."""
    ref = {"ids": IDS}
    for name, q in layers(model).items():
        _, scale, _, g_idx = group_table(q)
        ref[f"w.{name}"] = q.fake_weight().detach().float().contiguous()
        ref[f"s.{name}"] = scale[:, g_idx.long()].contiguous()
    with torch.no_grad():
        ref["logits"] = model(IDS).logits
    return ref


@pytest.fixture(scope="module")
def client_results(tmp_path_factory):
    """Every case saved by llmc and loaded by both clients in one run of the venv (imports dominate)."""
    root = tmp_path_factory.mktemp("clients")
    dtype = "float16"  # a CPU kernel type that holds the fp16 scales exactly (the 4-bit ATen kernels still
    # compute in bfloat16)
    cases = []
    for name, (fmt, wargs, actorder) in CASES.items():
        model = quantized(wargs, actorder=actorder, fp16_scales=True)
        fmt.save(model, make_tokenizer(), root / name)
        save_file(reference(model), str(root / f"{name}.ref.safetensors"))
        cases.append({"name": name, "folder": str(root / name), "ref": str(root / f"{name}.ref.safetensors")})
    manifest, out = root / "manifest.json", root / "results.json"
    manifest.write_text(json.dumps({"dtype": dtype, "cases": cases}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    run = subprocess.run([VENV_PYTHON, __file__, str(manifest), str(out)], env=env, capture_output=True,
                         text=True, timeout=900)
    if run.returncode == NO_CLIENT:
        pytest.skip(f"the GPTQModel venv cannot import its clients: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", list(CASES))
def test_client_computes_with_llmc_grid(client_results, case, client):
    r = client_results["results"][f"{case}/{client}"]
    assert "error" not in r, r["error"]
    # A zero point read one off (the v1/v2 confusion) is an error of exactly one step on every weight, and
    # moves these tiny models' logits by about 0.5. What remains is the kernels' rounding: half an fp16 ulp
    # (under 0.01 of a step for 3/8 bits), or bfloat16 arithmetic in the 4-bit ATen kernels (up to ~0.07).
    assert r["weight_err_steps"] < 0.25, r
    assert r["logits_err"] < 0.1, r
