"""The peer, re-measured beside llmc: llm-compressor's GPTQ (oneshot + GPTQModifier) on SmolLM2-135M with
the weight-only protocol of bench/weight_only.py (asym g64, lm_head float, the same 128 x 512 calibration
samples drawn by llmc's own loader, PPL on the first 40 x 2048 windows of wiki.test.raw in float32).

This host's speed drifts by a third between sessions (the same 40-window evaluation took 280 s one day and
390 s another), so a time target against a peer is only meaningful when both run back to back. llm-compressor
pins its own transformers, so it lives in its own virtual environment:

    python -m venv /tmp/venv_lc && /tmp/venv_lc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf
    LLMC_DATA=../shared/data /tmp/venv_lc/bin/python bench/peer_llmcompressor.py --bit 3 [--dtype float32]

Prints one JSON line (PPL, oneshot wall seconds, peak RSS) and appends it to bench/results/peer_llmcompressor.jsonl.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmc.config.loader import load_config  # noqa: E402
from llmc.data import load_calib_samples  # noqa: E402
from llmc.data.eval_text import load_eval_text  # noqa: E402
from llmc.evaluation.ppl import eval_windows  # noqa: E402
from llmc.models.load import load_model, resolve_source  # noqa: E402

GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
RESULTS = Path(__file__).parent / "results" / "peer_llmcompressor.jsonl"  # one line per run, appended


def perplexity(model, windows: torch.Tensor) -> float:
    nll = []
    with torch.no_grad():
        for ids in windows:
            nll.append(model(ids[None], labels=ids[None]).loss.float())
    return torch.exp(torch.stack(nll).mean()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bit", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hf-folder", default="/tmp/llmc_peer_smollm2", help="the GGUF model saved as an HF folder")
    a = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(GPTQ, [f"quant.weight.bit={a.bit}"])
    source = resolve_source(config.model.path, config.model.gguf_file)
    # llm-compressor re-reads the model's config by path, which a GGUF file has not: give it an HF folder
    folder = Path(a.hf_folder)
    if not (folder / "config.json").is_file():
        float_model, float_tokenizer = load_model(config.model.model_copy(update={"torch_dtype": "float32"}),
                                                  torch.device("cpu"))
        float_model.save_pretrained(folder)
        float_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, a.dtype))
    samples = load_calib_samples(config.calib, tokenizer)  # the samples llmc calibrates on
    data = Dataset.from_dict({"input_ids": [s.reshape(-1).tolist() for s in samples],
                              "attention_mask": [[1] * s.numel() for s in samples]})
    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": a.bit, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}}}
    recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"])

    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=config.calib.seq_len)
    seconds = time.perf_counter() - start
    print(f"oneshot: {seconds:.1f} s", flush=True)

    ev = config.eval[0]  # the GPTQ config's own evaluation: wikitext2, 40 x 2048
    windows = eval_windows(tokenizer, load_eval_text(ev.name[0], ev.path, False), ev.seq_len, ev.num_samples)
    ppl = perplexity(model.float(), windows)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = json.dumps({"peer": "llm-compressor 0.14.0.1 GPTQ", "bit": a.bit, "dtype": a.dtype, "ppl": ppl,
                      "oneshot_s": round(seconds, 1), "peak_rss_mb": round(rss), "date": time.strftime("%Y-%m-%d %H:%M")})
    print(row)
    with open(RESULTS, "a") as f:
        f.write(row + "\n")


if __name__ == "__main__":
    main()
