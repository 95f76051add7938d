"""Every config the repo ships validates as it is (paths resolved against a data folder like ../shared/data)."""
import shutil
from pathlib import Path

import pytest

from llmc.config.checks import algorithm_options
from llmc.config.loader import load_config, load_raw, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_validates(config, wiki_files, tmp_path, monkeypatch):
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    shutil.copy(wiki_files["test"], data / "wiki.test.raw")
    shutil.copy(wiki_files["valid"], data / "wiki.valid.tokens")
    monkeypatch.setenv("LLMC_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(ROOT)
    if "step_2" in config:  # reads what step 1 writes: schema and options only
        cfg = validate(load_raw(config))
        algorithm_options(cfg)
    else:
        cfg = load_config(config)
    assert cfg.model.path
