"""Models larger than memory (issue: scaling): a synthetic random-weight Llama of about 1B parameters
(4 GB in float32), written as sharded safetensors by this script, quantized with RTN and GPTQ W4 g128
fully loaded and with `model.offload: disk`; peak RSS and wall time side by side. The streamed runs
must stay below 35% of the checkpoint's size and give the same PPL as the loaded ones.

    python bench/offload.py [--redo] [--only LABEL ...] [--work DIR]   # writes bench/results/offload_1b.{json,md}
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import WORK, load_rows, markdown, run_row, save_rows

NAME = "offload_1b"
RTN = "configs/quantization/methods/RTN/rtn_w_only.yml"
GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=2048)
COMMON = ["model.type=Llama", "model.torch_dtype=float32", "quant.weight.group_size=128", "quant.weight.bit=4",
          "eval.eval_pos=[fake_quant]", "eval.num_samples=4", "eval.seq_len=512", "eval.compute_dtype=float32",
          "save.save_fake=True"]
GPTQ_CALIB = ["calib.n_samples=16", "calib.bs=4"]
ROWS = {
    "RTN W4 g128, loaded": (RTN, ["model.offload=none"]),
    "RTN W4 g128, streamed": (RTN, ["model.offload=disk"]),
    "GPTQ W4 g128, loaded": (GPTQ, ["model.offload=none"] + GPTQ_CALIB),
    "GPTQ W4 g128, streamed": (GPTQ, ["model.offload=disk"] + GPTQ_CALIB),
}


def synthetic_model(folder: Path) -> int:
    """Write the random Llama (and the tests' tiny tokenizer) once; returns the checkpoint's bytes."""
    if not (folder / "model.safetensors.index.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from tiny import VOCAB, make_tokenizer

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **SHAPE)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder, max_shard_size="500MB")
        make_tokenizer().save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def render(rows: dict, size: int) -> str:
    title = (f"Synthetic Llama {SHAPE['num_hidden_layers']} x {SHAPE['hidden_size']} (about 1B parameters, "
             f"checkpoint {size / 2**30:.2f} GiB float32, sharded safetensors), W4 asym g128; GPTQ calib 16 x 512; "
             "PPL (random weights: a consistency check) on 4 x 512, CPU (2 cores), llmc `bench/offload.py`")
    body = []
    for label, r in rows.items():
        body.append([label, f"{r['ppl']:.3f}", f"{r['quantize_s']:.1f}", f"{r['wall_s']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", f"{100 * r['peak_rss_mb'] * 2**20 / size:.1f}%"])
    return f"{title}\n\n" + markdown(["run", "PPL", "quantize s", "process wall s", "peak RSS MB",
                                      "peak RSS / checkpoint"], body)


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here.parent / "tests")]
    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--work", default=os.environ.get("LLMC_BENCH_WORK", "/tmp/llmc_bench_synthetic_1b"))
    a = parser.parse_args()
    folder = Path(a.work)
    size = synthetic_model(folder)
    rows = load_rows(NAME)
    for label, (config, overrides) in ROWS.items():
        if (a.only and label not in a.only) or (label in rows and not a.redo):
            continue
        print(f"running {label} ...", flush=True)
        rows[label] = run_row((config, overrides + [f"model.path={folder}"]), COMMON,
                              WORK / NAME / label.replace(" ", "_"))
        save_rows(NAME, rows, render(rows, size))
    print(render(rows, size))
