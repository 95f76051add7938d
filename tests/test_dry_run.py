import pytest

from llmc.cli import main


def test_dry_run_prints_the_plan_without_loading_weights(make_config, capsys, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("llmc.run.load_model", no_weights)
    path = make_config({"ignored_layers": {"block_ids": [1], "layer_names": ["mlp.down_proj"]}})
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 blocks" in out and "int4 asym g32" in out
    assert "mlp.gate_proj, mlp.up_proj" in out
    assert "model.layers.1.mlp.down_proj" in out and "ignored (float) linears: 1" in out
    assert "estimated peak memory" in out


@pytest.mark.parametrize("changes,key", [({"quant": {"weight": {"group_size": 24}}}, "quant.weight.group_size"),
                                         ({"quant": {"method": "GPTQQ"}}, "quant.method")])
def test_dry_run_reports_the_same_config_errors(make_config, capsys, changes, key):
    assert main(["--config", make_config(changes), "--dry-run"]) == 2
    assert key in capsys.readouterr().err


def test_dry_run_with_offload_estimates_one_resident_block(make_config, capsys):
    import re

    def estimate(extra):
        assert main(["--config", make_config(), "--dry-run", *extra]) == 0
        out = capsys.readouterr().out
        return float(re.search(r"weights ([\d.]+) MiB", out.split("estimated peak memory")[1]).group(1)), out

    full, _ = estimate([])
    streamed, out = estimate(["--set", "model.offload=disk"])
    assert "stream from disk, one resident at a time" in out and streamed < full
