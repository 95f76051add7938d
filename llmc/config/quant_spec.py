"""Quantizer sections of the config: one quantizer (weights or activations) and the KV-cache quantizer."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from loguru import logger
from pydantic import Field, field_validator, model_validator

from llmc.config.section import Granularity, Section
from llmc.quant.formats import FIXED_GROUP, GROUP_SIZE, QUANT_TYPES


class TwoLevelPartCfg(Section):
    """One level of LLMC's two-level W4A8 weights (`bit: 48`): `bit4` (the 4-bit groups, whose scales and zero
    points are held in the `scales_bit`/`zeros_bit` integer range) or `bit8` (the 8-bit per-channel base,
    codes in `int_range`)."""

    symmetric: bool = True
    granularity: Literal["per_channel", "per_group"] = "per_channel"
    group_size: int = -1
    int_range: Optional[tuple[int, int]] = None
    scales_bit: Optional[int] = Field(None, ge=2, le=16)
    scales_symmetric: bool = True
    zeros_bit: Optional[int] = Field(None, ge=2, le=16)
    zeros_symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TwoLevelPartCfg":
        if (self.granularity == "per_group") != (self.group_size >= 1):
            raise ValueError(f"group_size {self.group_size} with granularity {self.granularity}: per_group takes "
                             "group_size >= 1, per_channel group_size -1")
        if self.int_range is not None and not self.int_range[0] < self.int_range[1]:
            raise ValueError(f"int_range {list(self.int_range)} must be [low, high] with low < high")
        return self


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
    # QuaRot's a_clip_ratio (activations only): minmax ranges, dynamic or static, scaled by this factor
    # before the grid is set, so rare extremes clip and the bulk gets finer steps.
    clip_ratio: float = Field(1.0, gt=0, le=1)
    # Round every scale to this dtype when it is found, so the fake-quant model is exactly what a format
    # storing such scales computes (AutoAWQ and GPTQ checkpoints store float16 scales).
    # float16_7bit: float16 with 7 significant bits, so (zero + 8)·scale is a float16 too (save_gguf's Q4_1).
    scale_dtype: Optional[Literal["float32", "float16", "bfloat16", "float16_7bit"]] = None
    # LLMC's round_zp: False keeps asymmetric zero points as floats (HQQ optimises them); only the
    # fake-quant model can hold them (packed exports refuse).
    round_zp: bool = True
    # INC's enable_full_range: symmetric integer grids with scale = absmax / 2^(b-1) (signed, so the absmax
    # is the code -2^(b-1) exactly) instead of absmax / (2^(b-1) - 1/2); packed exports refuse it.
    full_range: bool = False
    # LLMC's export knobs, checked against the save keys (llmc/config/checks.py): need_pack True = integer
    # weights packed into int32 (compressed-tensors pack-quantized, save_vllm/save_sgl); pack_version =
    # AutoAWQ's packing (save_autoawq writes gemm_pack).
    need_pack: Optional[bool] = None
    pack_version: Optional[Literal["gemm_pack", "gemv_pack"]] = None
    # granularity per_block: square block_size x block_size weight tiles, one scale each (LLMC; DeepSeek's FP8).
    block_size: Optional[int] = Field(None, ge=1)
    # LLMC's old switch to hold qmin/qmax as tensors (its quantizer has done so unconditionally since); logged.
    qmax_to_tensor: Optional[bool] = None
    # bit 48: LLMC's two-level W4A8 weights (llmc/quant/twolevel.py).
    bit4: Optional[TwoLevelPartCfg] = None
    bit8: Optional[TwoLevelPartCfg] = None
    # quant.method DGQ: w_1 the 4-bit groups, w_2 the 8-bit per-channel base (llmc/algorithms/dgq.py).
    w_1: Optional["QuantSpecCfg"] = None
    w_2: Optional["QuantSpecCfg"] = None

    @field_validator("bit")
    @classmethod
    def _bit(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 8 and v != 48:
            raise ValueError("integer bits must be between 1 and 8 (or 48: LLMC's two-level W4A8 with bit4/bit8)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        """Fill in what a named format fixes and refuse what contradicts it (before the field checks, so
        the defaults of bit and granularity are the format's)."""
        return _format_defaults(v) if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _schemes(self) -> "QuantSpecCfg":
        """bit 48's sections, per_block's block_size, qmax_to_tensor (before the granularity checks)."""
        own = self.model_fields_set & {"symmetric", "granularity", "group_size", "block_size"}
        if self.bit == 48:
            if self.bit4 is None or self.bit8 is None:
                raise ValueError("bit 48 (two-level W4A8) needs both bit4 (the 4-bit groups) and bit8 (the 8-bit "
                                 "per-channel base) sections")
            if own:
                raise ValueError(f"{', '.join(sorted(own))} with bit 48: each level takes its own, under bit4 and bit8")
            if self.bit8.granularity != "per_channel" or self.bit8.scales_bit or self.bit8.zeros_bit:
                raise ValueError("bit8 of bit 48 is the per-channel base: granularity per_channel, no "
                                 "scales_bit/zeros_bit")
            if self.quant_type != "int-quant" or self.calib_algo != "minmax":
                raise ValueError(f"bit 48 is an integer minmax scheme (got quant_type {self.quant_type}, calib_algo "
                                 f"{self.calib_algo})")
        elif self.bit4 is not None or self.bit8 is not None:
            raise ValueError(f"bit4/bit8 sections go with bit: 48 (LLMC's two-level W4A8); got bit {self.bit}")
        if (self.granularity == "per_block") != (self.block_size is not None):
            raise ValueError(f"block_size {self.block_size} goes with granularity per_block (got granularity "
                             f"{self.granularity})" if self.block_size is not None else
                             "granularity per_block needs block_size (e.g. block_size: 128)")
        if self.granularity == "per_block" and (not self.symmetric or self.calib_algo != "minmax"):
            raise ValueError("granularity per_block is symmetric with minmax ranges (one absmax per tile, as LLMC); "
                             f"got symmetric {self.symmetric}, calib_algo {self.calib_algo}")
        if self.qmax_to_tensor is not None:
            logger.info(f"qmax_to_tensor: {self.qmax_to_tensor} accepted without effect: LLMC's early quantizer held "
                        "qmin/qmax as tensors with it, and has done so unconditionally since; the grid is the same")
        if (self.w_1 is None) != (self.w_2 is None):
            raise ValueError("DGQ's weight section takes both w_1 (4-bit groups) and w_2 (8-bit per-channel base)")
        if self.w_1 is not None and (own or "bit" in self.model_fields_set):
            raise ValueError(f"{', '.join(sorted(own | ({'bit'} & self.model_fields_set)))} beside w_1/w_2: DGQ's "
                             "two levels take their settings under w_1 and w_2")
        return self

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
        if self.full_range and (not self.symmetric or self.quant_type != "int-quant"):
            raise ValueError(f"full_range (INC's enable_full_range) is a symmetric integer grid; got symmetric "
                             f"{self.symmetric}, quant_type {self.quant_type}: set symmetric: True with an integer "
                             "bit, or remove full_range")
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
    """Fake quantization of the keys (after rotary embedding) and values attention reads (llmc/quant/kvcache.py).

    Naive: per_token (one range per token over all heads) or per_head (one per token and head), from each
    input; static: one range per layer (per_tensor) or per key/value head (per_head), calibrated once on the
    calibration set. Kivi (KIVI, Liu et al. 2024): keys per channel over groups of tokens, values per token
    over groups of channels, the most recent residual_length tokens kept in float (llmc/quant/kivi.py)."""

    method: Literal["Naive", "Kivi"] = "Naive"
    bit: Union[int, Literal["e4m3", "e5m2"]] = 8
    symmetric: bool = True
    granularity: Literal["per_token", "per_head", "per_tensor", "per_group"] = "per_token"
    group_size: int = -1
    # LLMC's per_head key: the number of key/value heads (checked against the model).
    head_num: Optional[int] = Field(None, ge=1)
    # Static ranges calibrated on the calibration set; unset: follows quant.act.static, as LLMC does.
    static: Optional[bool] = None
    # KIVI's float window R (LLMC's key; 128 there and in the paper).
    residual_length: Optional[int] = Field(None, ge=1)

    @field_validator("bit")
    @classmethod
    def _bit(cls, v: Any) -> Any:
        if isinstance(v, int) and not 2 <= v <= 8:
            raise ValueError("integer bits must be between 2 and 8")
        return v

    @model_validator(mode="after")
    def _method(self) -> "KVCacheCfg":
        g = self.granularity
        if self.head_num is not None and g != "per_head":
            raise ValueError(f"head_num {self.head_num} is only used with granularity per_head (got {g})")
        if g != "per_group" and self.group_size not in (-1, 0):
            raise ValueError(f"group_size {self.group_size} is only used with granularity per_group (got {g})")
        if self.method == "Kivi":
            if g not in ("per_token", "per_group"):
                raise ValueError(f"granularity {g} with method Kivi: KIVI quantizes keys per channel and values per "
                                 "token; choose per_token (one group per token and head) or per_group with group_size")
            if self.static:
                raise ValueError("static True with method Kivi: KIVI's ranges come from the cached tokens "
                                 "(dynamic), as in the paper and LLMC; set static: False or method: Naive")
            if g == "per_group" and self.group_size < 1:
                raise ValueError("granularity per_group needs group_size >= 1 (KIVI's G, e.g. 32)")
            r = self.residual_length if self.residual_length is not None else 128
            if g == "per_group" and r % self.group_size:
                raise ValueError(f"residual_length {r} must be a multiple of group_size {self.group_size}: "
                                 "keys leave the float window in whole groups of tokens")
        else:
            if self.residual_length is not None:
                raise ValueError(f"residual_length {self.residual_length} is KIVI's float window; "
                                 "set method: Kivi or remove residual_length")
            if g == "per_group":
                raise ValueError("granularity per_group with method Naive: use per_token, per_head or per_tensor "
                                 "(per_group is KIVI's)")
            if self.static and g == "per_token":
                raise ValueError("static True with granularity per_token: static KV ranges are one per layer "
                                 "(per_tensor) or per key/value head (per_head)")
            if self.static is False and g == "per_tensor":
                raise ValueError("granularity per_tensor needs static ranges (static: True, or act.static: True)")
        return self

    @property
    def window(self) -> int:
        """KIVI's residual length R."""
        return self.residual_length if self.residual_length is not None else 128
