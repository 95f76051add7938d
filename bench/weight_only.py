"""Weight-only methods on SmolLM2-135M (issue: AWQ and GPTQ): asymmetric g64, calibration 128 x 512 tokens
of wiki.valid.tokens (wikitext2_gptq windows), PPL on the first 40 x 2048 windows of wiki.test.raw.

    python bench/weight_only.py [--redo] [--only LABEL ...]   # writes bench/results/weight_only_smollm2.{json,md}
"""
from __future__ import annotations

from common import table_main

NAME = "weight_only_smollm2"
TITLE = ("SmolLM2-135M-Instruct, weight-only asym g64, calib 128 x 512 wiki.valid.tokens, PPL on wiki.test.raw "
         "first 40 x 2048, CPU (2 cores), llmc `bench/weight_only.py`")
RTN = "configs/quantization/methods/RTN/rtn_w_only.yml"
GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
AWQ = "configs/quantization/methods/Awq/awq_w_only.yml"
TEQ = "configs/quantization/methods/TEQ/teq_w_only.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]", "eval.compute_dtype=float32"]
ROWS = {  # in the order they run: peer comparisons first, the long AWQ rows last
    "AWQ W4 (64 samples)": (AWQ, ["calib.n_samples=64"]),
    # The shipped config clips asymmetrically (clip_sym: False, LLMC's default for asymmetric weights);
    # llmc's default without the key is AutoAWQ's ±absmax clip.
    "AWQ W4 (64 samples), clip_sym True": (AWQ, ["calib.n_samples=64", "quant.special.clip_sym=True"]),
    "GPTQ W4": (GPTQ, []),
    "GPTQ W3": (GPTQ, ["quant.weight.bit=3"]),
    "GPTQ W2": (GPTQ, ["quant.weight.bit=2"]),
    # llm-compressor's GPTQ collects every Hessian of a block in one pass; true_sequential (the default
    # here) re-runs the block for each subset so it sees the earlier ones quantized.
    "GPTQ W3, one pass per block": (GPTQ, ["quant.weight.bit=3", "quant.special.true_sequential=False"]),
    "RTN W4": (RTN, []),
    "RTN W3": (RTN, ["quant.weight.bit=3"]),
    "RTN W2": (RTN, ["quant.weight.bit=2"]),
    "AWQ W4": (AWQ, []),
    "AWQ W3": (AWQ, ["quant.weight.bit=3"]),
    "AWQ W2": (AWQ, ["quant.weight.bit=2"]),  # the reference OmniQuant's W2 rows must beat
    # TEQ (INC's trainable equivalent transformation): 100 Adam steps per block at INC's lr 1e-3, beside AWQ
    "TEQ W4": (TEQ, []),
    "TEQ W3": (TEQ, ["quant.weight.bit=3"]),
    # Intel Neural Compressor's estimator and lr
    "TEQ W4 (INC's identity estimator, lr 1e-3)": (TEQ, ["quant.special.estimator=identity", "quant.special.lr=0.001"]),
    "TEQ W3 (INC's identity estimator, lr 1e-3)": (TEQ, ["quant.weight.bit=3", "quant.special.estimator=identity",
                                                        "quant.special.lr=0.001"]),
    "FP": (RTN, ["eval.eval_pos=[pretrain]"]),
}


if __name__ == "__main__":
    table_main(NAME, TITLE, ROWS, EVAL)
