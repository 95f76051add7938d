"""Every config the repo ships validates as it is, and runs end to end on the tiny model: the shipped file
unchanged but for the model (pkg: → the tiny checkpoint) and sizes shrunk through `--set`, run from a
working folder whose `../shared/data` holds the data, so `${LLMC_DATA:-../shared/data}`, `./save/...` and
`configs/lm_eval_tasks` resolve as they do for a user; two-step recipes run in order, step 2 reading the
files step 1 wrote at the paths the configs name."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from llmc.cli import main
from llmc.config.checks import algorithm_options
from llmc.config.loader import load_config, load_raw, validate
from llmc.export.state import state_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yml"))
# LLMC's folder names for what `save` asks for
SAVED = {"save_trans": "transformed_model", "save_fake": "fake_quant_model", "save_autoawq": "autoawq_quant_model",
         "save_gptq": "gptq_quant_model", "save_vllm": "vllm_quant_model", "save_sgl": "sgl_quant_model",
         "save_mlcllm": "mlcllm_quant_model", "save_lightllm": "lightllm_quant_model",
         "save_trtllm": "trtllm_quant_model", "save_gguf": "gguf_quant_model/model.gguf"}


def _jobs() -> list[list[str]]:
    """One job per config; a step_1 and its step_2 form one job, in that order."""
    jobs = []
    for config in CONFIGS:
        if "step_2" in config:
            continue
        folder = config.rsplit("/", 1)[0] + "/step_2"
        jobs.append([config, next(c for c in CONFIGS if c.startswith(folder))] if "step_1" in config else [config])
    assert sum(map(len, jobs)) == len(CONFIGS), "a step_2 config without its step_1"
    return jobs


@pytest.fixture
def user_dirs(wiki_files, tmp_path, monkeypatch):
    """tmp/work as the working folder (with the repository's configs/ beside it) and tmp/shared/data holding
    wikitext2 and a small ARC-Easy jsonl, where the shipped configs' defaults look for them."""
    data = tmp_path / "shared" / "data"
    (data / "wikitext2").mkdir(parents=True)
    shutil.copy(wiki_files["test"], data / "wikitext2" / "wiki.test.raw")
    shutil.copy(wiki_files["valid"], data / "wikitext2" / "wiki.valid.tokens")
    (data / "lm_eval").mkdir()
    docs = [("Which one is a unit of time?", ["second", "meter", "gram", "volt"], "A"),
            ("What do plants need to make food?", ["sand", "sunlight", "plastic", "iron"], "B"),
            ("Which is a liquid at room temperature?", ["salt", "stone", "water", "wood"], "C"),
            ("What does a thermometer measure?", ["mass", "length", "speed", "temperature"], "D")]
    (data / "lm_eval" / "arc_easy_test.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}) + "\n"
        for i, (q, c, a) in enumerate(docs)))
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    monkeypatch.delenv("LLMC_DATA", raising=False)
    monkeypatch.chdir(work)
    return work


def _overrides(raw: dict, model: str) -> list[str]:
    """--set assignments that put a config on the tiny model at test sizes (only keys it already has)."""
    sets = []
    if str(raw["model"]["path"]).startswith("pkg:"):  # a step 2 keeps reading step 1's saved model
        sets.append(f"model.path={model}")
    if "calib" in raw:
        bs = raw["calib"].get("bs", -1)
        sets += ["calib.n_samples=4", "calib.seq_len=32"] + ([f"calib.bs={min(bs, 4)}"] if bs != -1 else [])
    evals = raw.get("eval") or []
    for i, ev in enumerate(evals if isinstance(evals, list) else [evals]):
        key = f"eval.{i}" if isinstance(evals, list) else "eval"
        if ev.get("type") == "lm_eval":
            sets.append(f"{key}.limit=4")
        else:
            sets += [f"{key}.seq_len=64", f"{key}.num_samples=2"]
    stages = raw.get("stages") or [raw["quant"]]
    for i, quant in enumerate(stages):
        key = f"stages.{i}" if "stages" in raw else "quant"
        if "epochs" in quant.get("special", {}):
            sets.append(f"{key}.special.epochs=1")
        if "iters" in quant.get("special", {}):  # SignRound: signed-gradient steps per block
            sets.append(f"{key}.special.iters=2")
        if "iterations" in quant.get("special", {}):  # TesseraQ: steps per threshold
            sets.append(f"{key}.special.iterations=2")
        if "train_steps" in quant.get("special", {}):  # TEQ: Adam steps per block
            sets.append(f"{key}.special.train_steps=2")
        if quant.get("weight", {}).get("granularity") == "per_group":
            assert 64 % quant["weight"]["group_size"] == 0  # divides the tiny widths (64, 128) as shipped
        for name, setting in (quant.get("mix_bits") or {}).items():  # block ids of SmolLM2's 30 → the tiny 3
            names = []
            for layer in setting.get("layer_name", []):
                base, _, ids = str(layer).partition("#")
                ids = sorted({int(i) % 3 for i in ids.split("-")}) if ids else []
                names.append(base + ("#" + "-".join(map(str, ids)) if ids else ""))
            sets.append(f"{key}.mix_bits.{name}.layer_name=[{', '.join(names)}]")
    return sets


def _expected_outputs(raw: dict) -> list[Path]:
    save = raw.get("save") or {}
    out = [Path(save["save_path"]) / "results.json"]
    out += [Path(save["save_path"]) / (folder if folder.endswith(".gguf") else f"{folder}/config.json")
            for key, folder in SAVED.items() if save.get(key)]
    for quant in raw.get("stages") or [raw["quant"]]:
        special = quant.get("special", {})
        if special.get("save_scale"):
            out.append(state_file(special["scale_path"], "scales"))
        if special.get("save_clip"):
            out.append(state_file(special["clip_path"], "clips"))
    return out


@pytest.mark.parametrize("job", _jobs(), ids=lambda job: job[0].removeprefix("configs/").removeprefix("quantization/"))
def test_shipped_config_runs_end_to_end(job, user_dirs, tiny_dir):
    if any("lm_eval" in c for c in job):
        pytest.importorskip("lm_eval")
    for config in job:
        raw = yaml.safe_load((ROOT / config).read_text())
        sets = [arg for a in _overrides(raw, tiny_dir("llama")) for arg in ("--set", a)]
        assert main(["--config", str(ROOT / config), *sets]) == 0, config
        for path in _expected_outputs(raw):
            assert path.is_file(), f"{config}: {path} missing"
        results = json.loads((Path(raw["save"]["save_path"]) / "results.json").read_text())
        evals = raw["eval"] if isinstance(raw["eval"], list) else [raw["eval"]]
        ppl = {e["pos"]: e["ppl"] for e in results["evals"] if "ppl" in e}
        assert set(ppl) == {p for ev in evals if ev.get("type", "ppl") == "ppl" for p in ev["eval_pos"]}, config
        assert all(math.isfinite(v) and v > 1 for v in ppl.values()), (config, ppl)  # exp(NLL) of a non-oracle
        tasks = [e for e in results["evals"] if e.get("type") == "lm_eval"]
        assert {e["pos"] for e in tasks} == {p for ev in evals if ev.get("type") == "lm_eval" for p in ev["eval_pos"]}
        assert all(math.isfinite(e["value"]) and e["samples"] == 4 for e in tasks), (config, tasks)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_validates(config, user_dirs):
    if "step_2" in config:  # reads what step 1 writes: schema and options only
        cfg = validate(load_raw(ROOT / config))
        algorithm_options(cfg)
    else:
        cfg = load_config(ROOT / config)
    assert cfg.model.path
