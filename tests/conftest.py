import json
from pathlib import Path

import pytest
import yaml

from tiny import save_model

WIKI_LINES = [
    " = Tiny Article = ",
    " ",
    " Quantization maps floating point weights to a small grid of integers . ",
    " A decoder block holds attention and a feed forward network . ",
    " ",
    " = = Section = = ",
    " Perplexity is the exponential of the mean negative log likelihood . ",
    " Calibration text flows through the model one block at a time . ",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Saved tiny models, one folder per family, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return lambda family="llama": save_model(root, family) if not (root / f"tiny-{family}").exists() \
        else str(root / f"tiny-{family}")


@pytest.fixture(scope="session")
def wiki_files(tmp_path_factory):
    """Wikitext-format test and validation files written by the tests themselves."""
    root = tmp_path_factory.mktemp("wiki")
    test, valid = root / "wiki.test.raw", root / "wiki.valid.tokens"
    test.write_text("\n".join(WIKI_LINES * 40) + "\n")
    valid.write_text("\n".join(reversed(WIKI_LINES * 40)) + "\n")
    return {"test": str(test), "valid": str(valid)}


@pytest.fixture
def make_config(tmp_path, tiny_dir, wiki_files):
    """Write a config for a tiny model; `changes` are deep-merged into a working RTN baseline."""

    def build(changes=None, family="llama", name="cfg.yml"):
        cfg = {
            "base": {"seed": 0},
            "model": {"path": tiny_dir(family), "torch_dtype": "float32"},
            "eval": {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2", "download": False,
                     "path": wiki_files["test"], "seq_len": 64, "bs": 2, "num_samples": 4},
            "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                                  "group_size": 32}},
            "save": {"save_fake": False, "save_path": str(tmp_path / "out")},
        }
        _merge(cfg, changes or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return build


def _merge(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if value is _DELETE:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


_DELETE = object()


@pytest.fixture
def DELETE():
    return _DELETE


def read_results(path) -> dict:
    return json.loads(Path(path).read_text())
