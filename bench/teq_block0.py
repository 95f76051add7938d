"""TEQ against round-to-nearest on SmolLM2-135M's first block alone (W4 g64 asym, 16 x 512 calibration tokens,
float32 forwards, 50 Adam steps on mini-batches of 4): the block's output MSE against the float block over the
16 samples, per learning rate. A quick probe of whether the learned scales help before a full bench row.

    python bench/teq_block0.py [LR ...]    # default 0.001 0.005 0.02; prints (MSE, seconds) per run

Measured on a loaded shared 2-core machine (2026-12-01; times not comparable): RTN 0.031788; TEQ lr 0.001
0.032500, lr 0.005 0.034926, lr 0.02 0.036833: the straight-through gradient (INC's identity estimator)
raised the block error at every rate tried.
"""
import copy
import sys
import time
from pathlib import Path

import torch

from llmc.config.loader import load_raw, validate
from llmc.data import batch_samples, load_calib_samples
from llmc.engine.block import BlockJob
from llmc.engine.capture import capture_block_inputs
from llmc.engine.context import RunContext
from llmc.models import adapter_class, load_model
from llmc.algorithms.rtn import RTN
from llmc.algorithms.base import Options
from llmc.algorithms.teq import TEQ, TeqOptions
from llmc.quant.quantizer import QuantArgs
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    cfg = validate(load_raw(str(ROOT / "configs/quantization/methods/TEQ/teq_w_only.yml"), ["calib.n_samples=16", "model.compute_dtype=float32"]))
    ctx = RunContext.from_config(cfg, torch.device("cpu"))
    model, tok = load_model(cfg.model, ctx.device)
    adapter = adapter_class("llama", None)(model)
    batches = batch_samples(load_calib_samples(cfg.calib, tok), 8)
    inputs = capture_block_inputs(model, adapter, batches, ctx)
    block = adapter.block_list()[0]
    args = QuantArgs.from_cfg(cfg.quant.weight)
    def err(algo):
        b = copy.deepcopy(block)
        job = BlockJob(0, "model.layers.0", b, adapter.subsets, inputs, set(), ctx, head_dim=64)
        targets = job.forward()
        t = time.time()
        algo.apply(job, targets)
        out = job.forward()
        e = sum(((o - t_) ** 2).sum() for o, t_ in zip(out, targets)).item() / sum(t_.numel() for t_ in targets)
        return e, time.time() - t
    print("RTN", err(RTN(args, None, Options())), flush=True)
    for lr in map(float, sys.argv[1:] or ["0.001", "0.005", "0.02"]):
        print("TEQ lr", lr, err(TEQ(args, None, TeqOptions(train_steps=50, lr=lr, batch_size=4))), flush=True)


if __name__ == "__main__":
    main()
