"""Float checkpoints loadable by transformers: the transformed model (`transformed_model/`) and the
fake-quantized one (`fake_quant_model/`), the latter with a record of its activation quantizers so
`load_fake_quant` restores them."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmc.export.atomic import atomic_dir
from llmc.models.adapter import get_module, set_module
from llmc.quant.fake_linear import QuantLinear, quant_linears
from llmc.quant.quantizer import QuantArgs

ACT_RECORD = "llmc_quant.json"
ACT_SCALES = "llmc_act_scales.safetensors"


@contextmanager
def plain_linears(model: nn.Module, fake: bool) -> Iterator[list[tuple[str, QuantLinear]]]:
    """Temporarily swap every QuantLinear for an nn.Linear with the float or fake-quantized weight."""
    swapped = list(quant_linears(model))
    for name, q in swapped:
        set_module(model, name, q.to_linear(fake))
    try:
        yield swapped
    finally:
        for name, q in swapped:
            set_module(model, name, q)


def _save_hf(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_transformed(model, tokenizer, path: str | Path) -> None:
    with atomic_dir(path) as tmp, plain_linears(model, fake=False):
        _save_hf(model, tokenizer, tmp)


def save_fake_quant(model, tokenizer, path: str | Path) -> None:
    with atomic_dir(path) as tmp, plain_linears(model, fake=True) as swapped:
        _save_hf(model, tokenizer, tmp)
        record, scales = {}, {}
        for name, q in swapped:
            entry = {"weight": q.wargs.describe() if q.wargs else None}
            if q.act_quant is not None:
                entry["act"] = asdict(q.act_quant.args)
                if q.act_quant.args.static:
                    scales[f"{name}.scale"] = q.act_quant.scale.contiguous().cpu()
                    scales[f"{name}.zero"] = q.act_quant.zero.contiguous().cpu()
            record[name] = entry
        (tmp / ACT_RECORD).write_text(json.dumps({"format": "llmc-fake-quant/1", "layers": record}, indent=2))
        if scales:
            save_file(scales, str(tmp / ACT_SCALES))


def load_fake_quant(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a `fake_quant_model/` folder: weights are already on their grid; activation quantizers are
    re-installed from the record so the model computes what it computed in memory."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    record = json.loads((path / ACT_RECORD).read_text())["layers"] if (path / ACT_RECORD).exists() else {}
    scales = load_file(str(path / ACT_SCALES)) if (path / ACT_SCALES).exists() else {}
    for name, entry in record.items():
        if not entry.get("act"):
            continue
        q = QuantLinear(get_module(model, name), None, QuantArgs(**entry["act"]))
        if q.act_quant.args.static:
            q.act_quant.scale, q.act_quant.zero = scales[f"{name}.scale"], scales[f"{name}.zero"]
        set_module(model, name, q)
    return model
