"""The child of eval_pos `packed` for GPTQ and AutoAWQ folders, run by the GPTQModel venv's python (it imports
only torch, safetensors and transformers, which loads such folders through GPTQModel and optimum):

    python -P packed_client.py FOLDER WINDOWS.safetensors BS OUT.json

Writes {"ppl": ...}: exp of the mean over windows of each window's mean next-token NLL, as llmc computes it.
The model loads in float16, the dtype the CPU kernels hold the format's float16 scales in.
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(folder: str, windows_file: str, bs: str, out: str) -> int:
    windows = load_file(windows_file)["windows"]
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16).eval()
    nlls = []
    with torch.no_grad():
        for s in range(0, windows.shape[0], int(bs)):
            ids = windows[s:s + int(bs)]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1))
    with open(out, "w") as f:
        json.dump({"ppl": torch.cat(nlls).mean().exp().item()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
