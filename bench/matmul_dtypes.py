"""Matmul throughput per dtype on this machine, at the shapes a SmolLM2 block forward runs
(8 x 512 tokens): decides whether `model.compute_dtype: bfloat16` pays off here.

    python bench/matmul_dtypes.py
"""
from __future__ import annotations

import time

import torch

SHAPES = [(4096, 576, 1536), (4096, 1536, 576), (4096, 576, 576), (4096, 576, 192), (2048, 2048, 2048)]


def gmacs(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(2):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):  # best of reps: this VM's neighbours make single timings noisy
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return m * k * n / best / 1e9


if __name__ == "__main__":
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GMAC/s, best of 10")
    print("| m x k x n | " + " | ".join(str(d).replace("torch.", "") for d in dtypes) + " |")
    print("|---|" + "---|" * len(dtypes))
    for shape in SHAPES:
        print(f"| {' x '.join(map(str, shape))} | " + " | ".join(f"{gmacs(*shape, d):.0f}" for d in dtypes) + " |")
