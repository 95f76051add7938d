"""Data-parallel calibration on SmolLM2-135M (issue: scaling): one process against two (torchrun, gloo,
one thread each) on this 2-core CPU, same configs and protocol as bench/weight_only.py. The 2-process PPL
should match the 1-process one (float summation order aside).

    python bench/data_parallel.py [--redo] [--only LABEL ...]   # writes bench/results/data_parallel_smollm2.{json,md}
"""
from __future__ import annotations

from common import table_main
from weight_only import AWQ, EVAL, GPTQ

NAME = "data_parallel_smollm2"
TITLE = ("SmolLM2-135M-Instruct, W4 asym g64, calib 128 x 512 (AWQ: 64 x 512), PPL on wiki.test.raw first 40 x 2048; "
         "1 process (2 threads) vs 2 processes (torchrun, gloo, 1 thread each), CPU (2 cores), "
         "llmc `bench/data_parallel.py`")
ROWS = {
    "GPTQ W4, 1 process": (GPTQ, [], 1),
    "GPTQ W4, 2 processes": (GPTQ, [], 2),
    "AWQ W4 (64 samples), 1 process": (AWQ, ["calib.n_samples=64"], 1),
    "AWQ W4 (64 samples), 2 processes": (AWQ, ["calib.n_samples=64"], 2),
}

if __name__ == "__main__":
    table_main(NAME, TITLE, ROWS, EVAL)
