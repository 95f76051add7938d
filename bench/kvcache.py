"""KV-cache quantization and static activation ranges on SmolLM2-135M: dynamic per-token KV (Naive), KIVI
(keys per channel, values per token, 128 recent tokens float), static per-tensor / per-head KV ranges
calibrated on 32 x 512 tokens of wiki.valid.tokens, and static per-tensor activations by minmax or LLMC's
histogram search (static_hist); weights int8 per-channel sym everywhere; PPL on the first 40 x 2048 windows
of wiki.test.raw (a KIVI window forward reads at each position what token-by-token decoding reads).

    python bench/kvcache.py [--redo] [--only LABEL ...]   # writes bench/results/kvcache_smollm2.{json,md}
"""
from __future__ import annotations

from common import table_main

NAME = "kvcache_smollm2"
TITLE = ("SmolLM2-135M-Instruct, W8 per-channel sym; KV cache and static activations; PPL on wiki.test.raw "
         "first 40 x 2048, CPU (2 cores), llmc `bench/kvcache.py`")
M = "configs/quantization/methods/"
NAIVE = M + "KVQuant/rtn_w_a_naive_quant_kv.yml"
KIVI = M + "KVQuant/rtn_w_a_kivi_quant_kv.yml"
TENSOR = M + "KVQuant/rtn_w_a_pertensor_static_naive_quant_kv.yml"
HEAD = M + "KVQuant/rtn_w_a_perhead_static_naive_quant_kv.yml"
STATIC = M + "RTN/rtn_w_a_pertensor_static.yml"
HIST = M + "RTN/rtn_w_a_pertensor_static_hist.yml"
EVAL = ["eval.num_samples=40", "eval.seq_len=2048", "eval.eval_pos=[fake_quant]"]
G32 = ["quant.kvcache.granularity=per_group", "quant.kvcache.group_size=32"]

ROWS = {
    "RTN W8A8 + KV int4 per-token (Naive)": (NAIVE, ["quant.kvcache.bit=4"]),
    "RTN W8A8 + KV int2 per-token (Naive)": (NAIVE, ["quant.kvcache.bit=2"]),
    "RTN W8A8 + KIVI int4 asym g32, R 128": (KIVI, ["quant.kvcache.bit=4"] + G32),
    "RTN W8A8 + KIVI int2 asym g32, R 128": (KIVI, G32),
    "RTN W8A8 + KIVI int2 asym per-token, R 128": (KIVI, []),
    "RTN W8A8 (static per-tensor act) + KV int8 static per-tensor": (TENSOR, []),
    "RTN W8A8 (static per-tensor act) + KV int8 static per-head": (HEAD, []),
    "RTN W8A8 (static per-tensor act) + KV int4 static per-head": (HEAD, ["quant.kvcache.bit=4"]),
    "RTN W8A8 static per-tensor act (minmax)": (STATIC, []),
    "RTN W8A8 static per-tensor act (static_hist)": (HIST, []),
    "FP": (NAIVE, ["eval.eval_pos=[pretrain]"]),
}


if __name__ == "__main__":
    table_main(NAME, TITLE, ROWS, EVAL)
