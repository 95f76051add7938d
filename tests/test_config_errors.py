"""Malformed configs fail fast (before any weight is loaded) with one message naming the key."""
import pytest
import yaml

from llmc.cli import main


def _run(path, *extra):
    return main(["--config", path, *extra])


CASES = [
    # (changes, words the message must contain)
    ({"quant": {"method": "RTM"}}, ["quant.method", "RTM", "Did you mean 'RTN'"]),
    ({"quant": {"weight": {"bit": 9}}}, ["quant.weight.bit", "between 1 and 8"]),
    ({"quant": {"weight": {"bit": "four"}}}, ["quant.weight.bit"]),
    ({"quant": {"weight": {"granularity": "per_grup"}}}, ["quant.weight.granularity", "per_grup"]),
    ({"quant": {"weight": {"granularity": "per_group", "group_size": -1}}}, ["quant.weight", "group_size"]),
    ({"quant": {"weight": {"group_size": 24}}}, ["quant.weight.group_size", "24", "in_features"]),
    ({"quant": {"weight": {"calib_algo": "kl"}}}, ["quant.weight.calib_algo", "kl"]),
    ({"quant": {"weight": {"symetric": False}}}, ["quant.weight.symetric", "unknown key", "symmetric"]),
    ({"quant": {"special": {"alpha": 0.5}}}, ["quant.special.alpha", "RTN"]),
    ({"quant": {"weight": {"granularity": "per_token", "group_size": -1}}}, ["quant.weight.granularity", "per_token"]),
    ({"quant": {"act": {"bit": 8, "granularity": "per_token", "static": True}}}, ["quant.act.static", "calib"]),
    ({"quant": {"act": {"bit": 8, "granularity": "per_token", "calib_algo": "percentile"}}},
     ["quant.act.calib_algo", "percentile", "dynamic"]),
    ({"quant": {"weight": {"calib_algo": "learnable"}}}, ["quant.weight.calib_algo", "learnable", "RTN"]),
    ({"quant": {"method": "SmoothQuant", "act": {"bit": 8, "granularity": "per_token"}, "special": {"alpha": 1.5}}},
     ["quant.special.alpha", "1.5", "[0, 1]"]),
    ({"quant": {"kvcache": {"bit": 1}}}, ["quant.kvcache.bit", "between 2 and 8"]),
    ({"quant": {"kvcache": {"granularity": "per_channel"}}}, ["quant.kvcache.granularity", "per_channel"]),
    ({"model": {"path": "/nonexistent/model"}}, ["model.path", "/nonexistent/model"]),
    ({"model": {"type": "Opt"}}, ["model.type", "Opt", "llama"]),
    ({"model": {"torch_dtype": "eval"}}, ["model.torch_dtype", "eval"]),
    ({"eval": {"path": "/nonexistent/wiki.test.raw"}}, ["eval.path", "/nonexistent/wiki.test.raw"]),
    ({"eval": {"name": "wikitext3"}}, ["eval.name", "wikitext3", "wikitext2"]),
    ({"eval": {"eval_pos": ["pretrain", "fakequant"]}}, ["eval.eval_pos", "fakequant"]),
    ({"eval": {"seq_len": 0}}, ["eval.seq_len"]),
    ({"calib": {"name": "wikitext2", "path": "/nonexistent/valid", "n_samples": 4, "seq_len": 16}},
     ["calib.path", "/nonexistent/valid"]),
    ({"calib": {"name": "wikitext2", "n_samples": 4, "seq_len": 16, "bs": 0}}, ["calib.bs"]),
    ({"calib": {"name": "wikitext2", "n_samples": 4, "seq_len": 16}}, ["calib.path", "required"]),
    ({"save": {"save_fake": True, "save_path": None}}, ["save", "save_path"]),
    ({"sav": {"save_fake": True}}, ["sav", "unknown key", "save"]),
    ({"model": {"path": "${LLMC_TEST_UNSET_VAR}"}}, ["model.path", "LLMC_TEST_UNSET_VAR"]),
]


@pytest.mark.parametrize("changes,words", CASES, ids=[w[0] for _, w in CASES])
def test_malformed_config_fails_fast_naming_the_key(make_config, changes, words, capsys, monkeypatch):
    import llmc.models.load as load

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the config error was reported")

    monkeypatch.setattr(load, "load_model", no_weights)
    monkeypatch.setattr("llmc.run.load_model", no_weights)
    code = _run(make_config(changes))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for word in words:
        assert word in err, f"'{word}' missing from: {err}"


def test_unknown_preproc_is_named(make_config, wiki_files, capsys):
    path = make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 16,
                                  "preproc": "gptq_wikitext2"}})
    assert _run(path) == 2
    err = capsys.readouterr().err
    assert "calib.preproc" in err and "gptq_wikitext2" in err and "wikitext2_gptq" in err


def test_bad_set_override_and_missing_file(make_config, capsys):
    assert main(["--config", "/nonexistent.yml"]) == 2
    assert "--config" in capsys.readouterr().err
    assert _run(make_config(), "--set", "quant.weight.bit") == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert _run(make_config(), "--set", "quant.weight.bit=12") == 2
    assert "quant.weight.bit" in capsys.readouterr().err


def test_non_empty_save_path_needs_overwrite(make_config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    assert _run(make_config({"save": {"save_path": str(out)}})) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_env_default_expands(make_config, tmp_path):
    from llmc.config import load_config

    cfg = load_config(make_config({"save": {"save_path": "${LLMC_TEST_UNSET_VAR:-" + str(tmp_path) + "/envout}"}}))
    assert cfg.save.save_path == f"{tmp_path}/envout"


def test_llmc_yaml_anchors_and_string_lists(tmp_path, make_config):
    from llmc.config import load_config

    path = make_config()
    raw = yaml.safe_load(open(path))
    text = yaml.safe_dump(raw).replace("seed: 0", "seed: &seed 7")
    cfg = load_config(_write(tmp_path, text))
    assert cfg.base.seed == 7 and cfg.eval[0].name == ["wikitext2"]


def _write(tmp_path, text):
    p = tmp_path / "anchors.yml"
    p.write_text(text)
    return str(p)
