"""The config schema, LLMC's sections as typed pydantic models.

Every section forbids unknown keys so a typo fails before any model is loaded. `quant.special`
is kept as a dict here and validated by the chosen algorithm's own options model.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from loguru import logger
from pydantic import ConfigDict, Field, field_validator, model_validator

from llmc.config.auto_mix_bits import AutoMixBitsCfg
from llmc.config.mix_bits import MixBitsSetting
from llmc.config.quant_spec import KVCacheCfg, QuantSpecCfg, quant_type_of  # noqa: F401  (re-exported)
from llmc.quant.formats import FIXED_GROUP
from llmc.config.section import Section

# save keys that write real quantized checkpoints (llmc/export/): refused together where they cannot work
PACKED_SAVES = ("save_autoawq", "save_gptq", "save_vllm", "save_sgl", "save_lightllm", "save_mlcllm", "save_trtllm",
                "save_gguf")
# packed: every packed export the run saves, reloaded by its client (llmc/evaluation/packed.py)
EVAL_POSITIONS = ("pretrain", "transformed", "fake_quant", "fake_quant_wo_kv", "packed")


class BaseCfg(Section):
    # Seeds Python's, NumPy's and torch's generators (CPU and CUDA) at the start of a run, and calibration
    # sampling when calib.seed is not given.
    seed: int = 42
    # The fold guard: after every fold of scales into the float model, the block must still compute its
    # float output on a calibration sample (llmc/engine/guard.py). False skips it (debugging only).
    check_folds: bool = True


class ModelCfg(Section):
    type: Optional[str] = None
    path: str
    gguf_file: Optional[str] = None
    # float8_e4m3fn (LLMC: torch.float8_e4m3fn): the checkpoint stores FP8 weights (DeepSeek-V3's 128 x 128
    # block-wise FP8, with block_wise_quant: True), dequantized at load (llmc/models/load.py).
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16", "float8_e4m3fn"] = "auto"
    block_wise_quant: bool = False

    @field_validator("torch_dtype", mode="before")
    @classmethod
    def _torch_spelling(cls, v: Any) -> Any:
        """LLMC spells dtypes as torch attributes (`torch.bfloat16`)."""
        return v.removeprefix("torch.") if isinstance(v, str) else v

    @model_validator(mode="after")
    def _block_wise(self) -> "ModelCfg":
        if self.block_wise_quant and self.torch_dtype != "float8_e4m3fn":
            raise ValueError(f"block_wise_quant True reads block-wise FP8 weights: it needs torch_dtype "
                             f"torch.float8_e4m3fn (got {self.torch_dtype})")
        return self
    tokenizer_mode: Literal["slow", "fast"] = "fast"
    # The dtype block forwards and learned methods compute in; statistics stay float32 whatever this is.
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # disk: decoder blocks stay on disk until their turn (models larger than RAM); auto: when the
    # checkpoint is larger than the RAM available.
    offload: Literal["none", "disk", "auto"] = "none"


class CalibCfg(Section):
    name: str
    download: bool = False
    path: Optional[str] = None
    n_samples: int = Field(128, ge=1)
    bs: int = -1
    seq_len: int = Field(512, ge=1)
    preproc: Optional[str] = None
    seed: Optional[int] = None  # None: base.seed
    # Keep captured block activations on the compute device (fast) or on the CPU (saves device memory).
    activations_on: Literal["device", "cpu"] = "device"
    # custom_txt from LLMC's custom data layout (path/samples.json): wrap each question in the tokenizer's
    # chat template (llmc/data/calib.py); name: ultrachat always goes through the template.
    apply_chat_template: bool = False
    # LLMC's padded batches of varying-length samples (chat data, whole custom_txt questions): each length
    # runs as its own batch, so no pad token reaches a block or a statistic (llmc/data/calib.py).
    padding: bool = False
    # Mixture-of-experts models (llm-compressor's name): while statistics are collected every expert also
    # sees the tokens the router did not send it (the block's output still follows the router); False:
    # each expert sees only its routed tokens, and an expert that gets none stops the run.
    calibrate_all_experts: bool = True

    @field_validator("bs")
    @classmethod
    def _bs(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 (one batch of all samples) or a positive batch size")
        return v


class EvalCfg(Section):
    eval_pos: list[Literal[EVAL_POSITIONS]] = ["pretrain", "fake_quant"]  # type: ignore[valid-type]
    name: list[str] = ["wikitext2"]
    # ppl; decode_ppl (token by token through the KV cache), token_acc (argmax agreement with the float
    # model), generate_only (greedy texts from custom_gen prompts): llmc/evaluation/; lm_eval below.
    type: Literal["ppl", "lm_eval", "decode_ppl", "token_acc", "generate_only"] = "ppl"
    download: bool = False
    path: Optional[str] = None
    seq_len: int = Field(2048, ge=2)
    bs: int = Field(1, ge=1)
    num_samples: Optional[int] = Field(None, ge=1)
    inference_per_block: bool = False
    # The dtype of evaluation forwards; None follows model.compute_dtype. float32 keeps PPL comparable
    # across runs whose quantization used bfloat16 forwards.
    compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    # type lm_eval: lm-evaluation-harness tasks on the in-memory model (llmc/evaluation/lm_eval.py).
    tasks: list[str] = []
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[Union[int, float]] = Field(None, gt=0)  # documents per task; below 1, a fraction
    batch_size: Optional[int] = Field(None, ge=1)  # None: bs
    include_path: Optional[str] = None  # a folder of task YAMLs
    num_eval_tokens: Optional[int] = Field(None, ge=1)  # decode_ppl: stop after this many predicted tokens
    max_new_tokens: Optional[int] = Field(None, ge=1)  # generate_only: tokens generated per prompt (32)
    apply_chat_template: bool = False  # generate_only: wrap each prompt in the tokenizer's chat template

    def path_for(self, name: str) -> Optional[str]:
        """LLMC reads several datasets of one section from path/<name>; a single one from path itself."""
        if self.path is None or len(self.name) == 1:
            return self.path
        import os

        return os.path.join(self.path, name)

    @model_validator(mode="before")
    @classmethod
    def _lm_eval_spelling(cls, v: Any) -> Any:
        """`lm-eval`/`harness` mean lm_eval; LLMC-style `name` lists the tasks when `tasks` is absent."""
        if isinstance(v, dict) and str(v.get("type", "")).lower().replace("-", "_") in ("lm_eval", "harness"):
            v = {**v, "type": "lm_eval"}
            if "tasks" not in v and "name" in v:
                v["tasks"] = v.pop("name")
        return v

    @field_validator("eval_pos", "name", "tasks", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("eval_pos", mode="before")
    @classmethod
    def _pos_spelling(cls, v: Any) -> Any:
        """LLMC ignores an eval_pos it does not know (its `fake-quant` typo evaluates nothing); here a
        position spelled with '-' or ' ' for '_' is read as meant, with a warning, and anything else is refused."""
        if not isinstance(v, list):
            return v
        out = []
        for pos in v:
            fixed = pos.strip().lower().replace("-", "_").replace(" ", "_") if isinstance(pos, str) else pos
            if fixed != pos and fixed in EVAL_POSITIONS:
                from loguru import logger

                logger.warning(f"eval.eval_pos: '{pos}' read as '{fixed}' (LLMC would skip this position)")
            out.append(fixed if fixed in EVAL_POSITIONS else pos)
        return out


class QuantCfg(Section):
    method: str
    weight: Optional[QuantSpecCfg] = None
    act: Optional[QuantSpecCfg] = None
    kvcache: Optional[KVCacheCfg] = None
    special: dict[str, Any] = {}
    quant_out: bool = False
    # MoE routers and shared-expert gates stay float (their outputs pick experts); names listed here
    # (relative to the block, e.g. mlp.gate) are round-to-nearest quantized with the weight quantizer.
    quantize_gates: list[str] = []
    # LLMC's per-layer settings by layer-name pattern (llmc/config/mix_bits.py)
    mix_bits: dict[str, MixBitsSetting] = {}
    # per-linear widths chosen from the data under an average budget (llmc/config/auto_mix_bits.py)
    auto_mix_bits: Optional[AutoMixBitsCfg] = None

    @field_validator("special", mode="before")
    @classmethod
    def _special(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="before")
    @classmethod
    def _special_quant_type(cls, v: Any) -> Any:
        """LLMC's FP_Quant configs repeat the weight's quant_type in `special`; it must name the same format."""
        if not isinstance(v, dict) or not isinstance(v.get("special"), dict) or "quant_type" not in v["special"]:
            return v
        special = dict(v["special"])
        given = special.pop("quant_type")
        weight = quant_type_of(v["weight"]) if isinstance(v.get("weight"), dict) else None
        if quant_type_of({"quant_type": given}) != weight:
            raise ValueError(f"special.quant_type {given} differs from quant.weight's quant_type {weight}; "
                             "remove special.quant_type or make them equal")
        return {**v, "special": special}

    @model_validator(mode="after")
    def _act_formats(self) -> "QuantCfg":
        act = self.act
        if act is not None and act.quant_type == "nf4":
            raise ValueError("act.quant_type nf4: NF4 is a weight-only format (QLoRA); quantize activations with "
                             "int-quant, float-quant, nvfp4 or mxfp4")
        if act is not None and act.quant_type in FIXED_GROUP and act.static:
            raise ValueError(f"act.quant_type {act.quant_type} with static: True: its group scales come from each input; "
                             "set static: False")
        kv = self.kvcache
        if kv is not None and kv.static is None:
            # LLMC: the KV cache is static exactly when the activations are (kvquant follows act.static)
            static = bool(act is not None and act.static and kv.method == "Naive")
            if static and kv.granularity == "per_token":
                raise ValueError("kvcache.granularity per_token with act.static True: LLMC then calibrates the KV cache "
                                 "statically, one range per layer (per_tensor) or per head (per_head); choose one, or "
                                 "set kvcache.static: False")
            if not static and kv.granularity == "per_tensor":
                raise ValueError("kvcache.granularity per_tensor needs static ranges (kvcache.static or act.static True)")
            kv.static = static
        return self


class TrtllmCfg(Section):
    """LLMC's `save.trtllm_cfg`: the parallel mapping of the TensorRT-LLM checkpoint (one rank file per
    tensor-parallel x pipeline-parallel rank)."""

    tp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)


class TuneEvalCfg(Section):
    """The held-out slice that scores auto-tune candidates: windows [start, start + num_samples) of one text,
    so `start` can skip the windows the report's eval section scores."""

    name: str = "wikitext2"
    download: bool = False
    path: Optional[str] = None
    seq_len: int = Field(2048, ge=2)
    start: int = Field(0, ge=0)
    num_samples: Optional[int] = Field(None, ge=1)  # None: every window from start on
    bs: int = Field(1, ge=1)
    compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None


class TuneCfg(Section):
    """Auto-tune (llmc/tune.py): every candidate quant section runs on the same loaded model, each is scored
    by perplexity on `eval`, and the lowest wins; only the winner is evaluated at fake_quant and saved.
    `builtin`: Intel Neural Compressor's weight-only list, RTN/GPTQ/AWQ x group_sizes, asymmetric, `bit` bits."""

    candidates: Union[Literal["builtin"], list[QuantCfg]]
    bit: Optional[int] = Field(None, ge=2, le=8)  # builtin only (4)
    group_sizes: Optional[list[int]] = None  # builtin only ([32, 128])
    eval: TuneEvalCfg

    @model_validator(mode="after")
    def _builtin_keys(self) -> "TuneCfg":
        if self.candidates != "builtin":
            given = [k for k in ("bit", "group_sizes") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{'/'.join(given)} shape the builtin candidates; with a list of candidates "
                                 "set them in each candidate's weight section")
            if len(self.candidates) < 2:
                raise ValueError(f"candidates: {len(self.candidates)} given; tuning chooses among at least 2 "
                                 "(for one method, use quant)")
        elif self.group_sizes is not None and (not self.group_sizes or min(self.group_sizes) < 1):
            raise ValueError(f"group_sizes {self.group_sizes}: a non-empty list of positive group sizes")
        return self


class SaveCfg(Section):
    save_trans: bool = False
    save_fake: bool = False
    # Real quantized checkpoints (llmc/export/): AutoAWQ GEMM, GPTQ v1, compressed-tensors for vLLM / SGLang.
    save_autoawq: bool = False
    save_gptq: bool = False
    save_autogptq: bool = False   # LLMC's name for AutoGPTQ's format: the GPTQ folder save_gptq writes
    save_vllm: bool = False
    save_sgl: bool = False
    save_lightllm: bool = False   # LLMC's LightLLM folder: the compressed-tensors checkpoint save_vllm writes
    save_mlcllm: bool = False     # MLC-LLM reads AutoAWQ GEMM weights (mlc_llm convert_weight --source-format awq)
    save_trtllm: bool = False     # a TensorRT-LLM checkpoint (config.json + rank<i>.safetensors) for trtllm-build
    trtllm_cfg: Optional[TrtllmCfg] = None
    save_gguf: bool = False       # a .gguf (Q4_0 / Q4_1 / Q8_0) for llama.cpp
    # LLMC's LightLLM export: the static KV-cache scales as FP8 (e4m3) scales, in save_path/<lightllm_kv_cache_name>.
    save_lightllm_kv_calib: bool = False
    lightllm_kv_cache_name: str = "kv_cache_calib.json"
    save_path: Optional[str] = None
    # Resume: progress saved after every block in save_path/.llmc_resume (removed when the run finishes).
    checkpoint: bool = True
    keep_checkpoint: bool = False

    @model_validator(mode="after")
    def _path(self) -> "SaveCfg":
        if self.save_autogptq and not self.save_gptq:  # one folder, checked and written as save_gptq
            object.__setattr__(self, "save_gptq", True)
        wanted = [k for k in ("save_trans", "save_fake", "save_lightllm_kv_calib") + PACKED_SAVES if getattr(self, k)]
        if wanted and not self.save_path:
            raise ValueError(f"{'/'.join(wanted)} need save_path")
        if self.trtllm_cfg is not None and not self.save_trtllm:
            raise ValueError("trtllm_cfg configures save_trtllm, which is not set; set save_trtllm: True or remove it")
        return self


class IgnoredLayersCfg(Section):
    """LLMC's ignored layers: a linear stays float when its block is in block_ids (all blocks when empty)
    and its name in layer_names (all when empty), or its full name is in special_names."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    block_ids: list[Union[int, str]] = []
    layer_names: list[str] = []
    special_names: list[str] = Field([], alias="speical_names")

    @field_validator("block_ids")
    @classmethod
    def _ids(cls, v: list) -> list:
        for item in v:
            if isinstance(item, str) and not _is_range(item):
                raise ValueError(f"'{item}' is not a block index or a range like '15-23'")
        return v

    def block_set(self) -> set[int]:
        ids: set[int] = set()
        for item in self.block_ids:
            if isinstance(item, int):
                ids.add(item)
            elif "-" in item:
                lo, hi = item.split("-")
                ids.update(range(int(lo), int(hi) + 1))
            else:
                ids.add(int(item))
        return ids


def _is_range(text: str) -> bool:
    parts = text.split("-")
    return all(p.strip().isdigit() for p in parts) and len(parts) in (1, 2)


class OpenCompassCfg(Section):
    """LLMC's OpenCompass hand-off (llmc/evaluation/opencompass.py)."""

    cfg_path: str
    max_num_workers: int = Field(1, ge=1)
    output_path: str = "./oc_output"


class Config(Section):
    base: BaseCfg = BaseCfg()
    model: ModelCfg
    calib: Optional[CalibCfg] = None
    eval: list[EvalCfg] = []
    quant: Optional[QuantCfg] = None
    # Beyond LLMC: several quant sections run in order in one process (AWQ → OmniQuant), each handing
    # its state (scales, clips) to the next in memory.
    stages: Optional[list[QuantCfg]] = None
    # Beyond LLMC: quant candidates, each run and scored, the best kept (llmc/tune.py).
    tune: Optional[TuneCfg] = None
    save: SaveCfg = SaveCfg()
    ignored_layers: Optional[IgnoredLayersCfg] = None
    opencompass: Optional[OpenCompassCfg] = None

    @model_validator(mode="after")
    def _quant_or_stages(self) -> "Config":
        given = [k for k in ("quant", "stages", "tune") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give either quant (one algorithm), stages (a list of quant sections run in order) or "
                             "tune (candidate quant sections, the best kept)" + (f"; got {' and '.join(given)}"
                                                                                  if given else ""))
        for i, stage in enumerate((self.stages or [])[:-1]):
            if stage.kvcache is not None:
                raise ValueError(f"stages.{i}.kvcache: the KV cache is quantized when the final model is evaluated "
                                 "and saved, which the last stage decides; move kvcache to the last stage")
        if self.calib is not None and self.calib.seed is None:
            self.calib.seed = self.base.seed
        return self

    def stage_configs(self) -> list["Config"]:
        """One config per stage, each with that stage as its quant section."""
        if not self.stages:
            return [self]
        return [self.model_copy(update={"quant": q, "stages": None}) for q in self.stages]

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_list(cls, v: Any) -> Any:
        if v is None:
            return []
        sections = [v] if isinstance(v, dict) else v
        if not isinstance(sections, list):
            return sections
        out = []
        for section in sections:
            if not (isinstance(section, dict) and "eval_token_consist" in section):
                out.append(section)
                continue
            # LLMC's eval_token_consist: the ppl section also scores the argmax agreement with the float model
            # on its windows, which is llmc's token_acc; it becomes a second section.
            section = dict(section)
            consist = section.pop("eval_token_consist")
            if not isinstance(consist, bool):
                raise ValueError(f"eval_token_consist: got {consist!r}; expected True or False")
            if consist and str(section.get("type", "ppl")) != "ppl":
                raise ValueError(f"eval_token_consist: True with type {section.get('type')}; expected type ppl "
                                 "(it adds a token_acc section on the same windows)")
            out += [section, {**section, "type": "token_acc"}] if consist else [section]
        return out
