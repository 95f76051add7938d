"""Quantizer sections of the config: one quantizer (weights or activations) and the KV-cache quantizer."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from loguru import logger
from pydantic import Field, field_validator, model_validator

from llmc.config.section import Granularity, Section
from llmc.quant.formats import FIXED_GROUP, GROUP_SIZE, QUANT_TYPES


class QuantSpecCfg(Section):
    """One quantizer: integer bits (or a float format name), sign, granularity and range calibration."""

    # int-quant (integer grid), float-quant (bit e2m1/e4m3/e5m2, LLMC's key), or a named 4-bit format
    # (nvfp4, mxfp4, nf4) whose bit and groups it fixes; inferred from bit when absent (docs/formats.md).
    quant_type: Literal[QUANT_TYPES] = "int-quant"  # type: ignore[valid-type]
    # LLMC simulates float formats through qtorch with it; here they are simulated natively either way.
    use_qtorch: Optional[bool] = None
    bit: Union[int, Literal["e2m1", "e4m3", "e5m2"]] = 8
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int = -1
    head_num: Optional[int] = Field(None, ge=1)
    calib_algo: Literal["minmax", "mse", "learnable", "static_hist", "percentile"] = "minmax"
    static: bool = False
    # Straight-through rounding gradients: what learned methods (OmniQuant) train with; None = the method's own.
    ste: Optional[bool] = None
    # mse search (GPTQ reference / LLMC): ranges p·[min, max], p = 1 - i/mse_grid for i < maxshrink·mse_grid;
    # error norm mse_norm; rows in mse_b_num chunks (memory only).
    maxshrink: float = Field(0.8, gt=0, le=1)
    mse_grid: int = Field(100, ge=1)
    mse_norm: float = Field(2.4, gt=0)
    mse_b_num: int = Field(1, ge=1)
    percentile: float = Field(99.99, gt=0, le=100)
    # Round every scale to this dtype when it is found, so the fake-quant model is exactly what a format
    # storing such scales computes (AutoAWQ and GPTQ checkpoints store float16 scales).
    # float16_7bit: float16 with 7 significant bits, so (zero + 8)·scale is a float16 too (save_gguf's Q4_1).
    scale_dtype: Optional[Literal["float32", "float16", "bfloat16", "float16_7bit"]] = None
    # LLMC's round_zp: False keeps asymmetric zero points as floats (HQQ optimises them); only the
    # fake-quant model can hold them (packed exports refuse).
    round_zp: bool = True
    # LLMC's export knobs, checked against the save keys (llmc/config/checks.py): need_pack True = integer
    # weights packed into int32 (compressed-tensors pack-quantized, save_vllm/save_sgl); pack_version =
    # AutoAWQ's packing (save_autoawq writes gemm_pack).
    need_pack: Optional[bool] = None
    pack_version: Optional[Literal["gemm_pack", "gemv_pack"]] = None

    @field_validator("bit")
    @classmethod
    def _bit(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 8:
            raise ValueError("integer bits must be between 1 and 8")
        return v

    @model_validator(mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        """Fill in what a named format fixes and refuse what contradicts it (before the field checks, so
        the defaults of bit and granularity are the format's)."""
        return _format_defaults(v) if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _group(self) -> "QuantSpecCfg":
        if self.granularity == "per_group" and self.group_size < 1:
            raise ValueError("granularity per_group needs group_size >= 1 (e.g. group_size: 128)")
        if self.granularity != "per_group" and self.group_size not in (-1, 0):
            raise ValueError(f"group_size {self.group_size} is only used with granularity per_group "
                             f"(got granularity {self.granularity}); set group_size: -1 or granularity: per_group")
        if self.granularity == "per_head" and self.head_num is None:
            raise ValueError("granularity per_head needs head_num")
        if self.head_num is not None and self.granularity != "per_head":
            raise ValueError(f"head_num {self.head_num} is only used with granularity per_head (got granularity "
                             f"{self.granularity}); remove head_num or set granularity: per_head")
        if isinstance(self.bit, str) and not self.symmetric:
            raise ValueError(f"bit {self.bit} is a float format: FP8 grids are symmetric around 0 and have no "
                             "zero point; set symmetric: True")
        if not self.round_zp and (self.symmetric or isinstance(self.bit, str)):
            raise ValueError("round_zp False keeps a float zero point, which only asymmetric integer grids have; "
                             "remove round_zp or set symmetric: False")
        if self.quant_type in FIXED_GROUP and (self.granularity != "per_group" or self.group_size != GROUP_SIZE[self.quant_type]):
            raise ValueError(f"quant_type {self.quant_type} has groups of {GROUP_SIZE[self.quant_type]} (its definition); got "
                             f"granularity {self.granularity}, group_size {self.group_size}: remove both or set "
                             f"granularity: per_group, group_size: {GROUP_SIZE[self.quant_type]}")
        if self.quant_type != "int-quant" and self.scale_dtype not in (None, "float32") and self.quant_type != "float-quant":
            raise ValueError(f"scale_dtype {self.scale_dtype} with quant_type {self.quant_type}: its scales are stored as the "
                             "format defines them (nvfp4: fp8 e4m3 under a float32 global scale; mxfp4: powers of two; "
                             "nf4: float32 absmax); remove scale_dtype")
        return self


def quant_type_of(v: dict) -> str:
    given = v.get("quant_type")
    if given is None:
        return "float-quant" if isinstance(v.get("bit"), str) else "int-quant"
    qt = str(given).lower().replace("_", "-")
    qt = qt + "-quant" if qt in ("int", "float") else qt
    if qt not in QUANT_TYPES:
        raise ValueError(f"quant_type '{given}' is not known; expected one of {', '.join(QUANT_TYPES)}")
    return qt


def _format_defaults(v: dict) -> dict:
    """quant_type spelled in any case (`float_quant`, `NVFP4`), inferred from bit when absent; a named format's
    bit, granularity and group size filled in; use_qtorch and LLMC's asymmetric float flag logged."""
    v = dict(v)
    given = v.get("quant_type")
    v["quant_type"] = qt = quant_type_of(v)
    bit = v.get("bit")
    if qt == "int-quant" and isinstance(bit, str):
        raise ValueError(f"bit {bit} is a float format but quant_type is int-quant; set quant_type: float-quant")
    if qt == "float-quant" and not isinstance(bit, str):
        raise ValueError(f"quant_type float-quant needs bit e2m1, e4m3 or e5m2 (got bit {bit})")
    if qt in GROUP_SIZE:
        allowed = (4,) if qt == "nf4" else (4, "e2m1")
        if bit is not None and bit not in allowed:
            raise ValueError(f"quant_type {qt} is a 4-bit format: bit {bit} contradicts it; remove bit or set bit: "
                             f"{' or '.join(map(str, allowed))}")
        v["bit"] = 4 if qt == "nf4" else "e2m1"
        if v.get("symmetric") is False:
            raise ValueError(f"quant_type {qt} is symmetric (no zero point); set symmetric: True")
        if "granularity" not in v and v.get("group_size") in (None, -1):
            v["granularity"], v["group_size"] = "per_group", GROUP_SIZE[qt]
    if v.get("use_qtorch") is not None:
        if qt != "float-quant":
            raise ValueError(f"use_qtorch applies to quant_type float-quant (LLMC's qtorch simulation); got {qt}")
        logger.info(f"use_qtorch: {v['use_qtorch']} accepted without effect: LLMC chooses with it between qtorch's "
                    "float cast and its own formula; llmc rounds natively onto the standard grid (scale = absmax / "
                    "format max), which qtorch's path gives for every format and LLMC's formula for e2m1")
    if qt == "float-quant" and given is not None and v.get("symmetric") is False:
        v["symmetric"] = True
        logger.info(f"symmetric: False with quant_type float-quant, bit {bit}: float grids have no zero point; "
                    "quantized symmetrically, as LLMC's FloatQuantizer does")
    return v


class KVCacheCfg(Section):
    """Dynamic fake quantization of the keys (after rotary embedding) and values attention reads:
    per_token (one range per token over all heads) or per_head (one per token and head)."""

    method: Literal["Naive"] = "Naive"
    bit: Union[int, Literal["e4m3", "e5m2"]] = 8
    symmetric: bool = True
    granularity: Literal["per_token", "per_head"] = "per_token"

    @field_validator("bit")
    @classmethod
    def _bit(cls, v: Any) -> Any:
        if isinstance(v, int) and not 2 <= v <= 8:
            raise ValueError("integer bits must be between 2 and 8")
        return v
