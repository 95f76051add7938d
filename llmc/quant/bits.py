"""Average bits per weight of a fake-quantized model, counting what a checkpoint of it must store.

Per quantized linear: each weight at its grid's bits (fp8: 8, fp4/nf4: 4), every group's scale (16 bits;
nvfp4's fp8 and mxfp4's E8M0: 8) and zero point (0 when symmetric, the weight's bits when an integer, 16 when
float), OWQ's float columns at 16 bits a weight, an act-order group index of 32 bits per input column. An
algorithm that stores something else (SpQR's quantized statistics and outliers) sets `storage_bits` itself.
Linears of the blocks left float count 16 bits a weight; embeddings and the head are not counted.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs

FLOAT_BITS = 16


def element_bits(args: QuantArgs) -> int:
    if args.is_float:
        return 4 if args.fmt in ("e2m1", "nf4") else 8
    return int(args.bit)


def grid_bits(a: QuantArgs, weights: int, groups: int) -> int:
    """Codes, and each group's scale and zero point."""
    scale_bits = 8 if a.quant_type in ("nvfp4", "mxfp4") else 16
    zero_bits = 0 if a.symmetric or a.is_float else (element_bits(a) if a.round_zp else 16)
    return weights * element_bits(a) + groups * (scale_bits + zero_bits)


def planned_bits(a: QuantArgs, out_features: int, in_features: int) -> int:
    """What a linear of this shape will take on grid `a`, before it is quantized."""
    groups = {"per_tensor": 1, "per_channel": out_features,
              "per_group": out_features * (in_features // max(a.group_size, 1)),
              "per_block": -(-out_features // (a.block_size or 1)) * (in_features // (a.block_size or 1))}
    return grid_bits(a, out_features * in_features, groups[a.granularity])


def linear_bits(q: QuantLinear) -> int:
    """Bits one quantized linear takes stored."""
    n = q.in_features * q.out_features
    if q.storage_bits is not None:
        return q.storage_bits
    if q.wargs is None:
        return FLOAT_BITS * n
    a = q.wargs
    if q.w_scale is None:
        q.set_weight_qparams()
    bits = grid_bits(a, n, q.w_scale.numel())
    cols = q.w_float_cols
    if cols is not None:
        kept = int(cols.sum()) if cols.dim() == 2 else len(cols) * q.out_features
        bits += kept * (FLOAT_BITS - element_bits(a))
    if q.w_gidx is not None:
        bits += 32 * q.in_features
    return bits


def average_bits(blocks: list[nn.Module]) -> Optional[float]:
    """Bits per weight over the decoder blocks' linears, float ones (ignored layers, routers) at 16; None when
    nothing is quantized."""
    total = weights = 0
    quantized = False
    for block in blocks:
        for module in block.modules():
            if isinstance(module, QuantLinear):
                total += linear_bits(module)
                quantized = quantized or module.wargs is not None
            elif isinstance(module, nn.Linear):
                total += FLOAT_BITS * module.in_features * module.out_features
            else:
                continue
            weights += module.in_features * module.out_features
    return total / weights if quantized else None
