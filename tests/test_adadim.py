"""AdaDim: the dimension it picks against an output-error computation written in the test, LLMC's config end
to end on the tiny model (every linear on the grid of one of the two dimensions), and the refusals."""
import pytest
import torch

from llmc.algorithms.adadim import axis_errors
from llmc.cli import main
from llmc.quant.quantizer import QuantArgs


def _rtn_rows(W, bit, gs=None):
    """Asymmetric min-max RTN of each row (or of each group of gs in a row), signed grid, range with 0."""
    shape = W.shape
    Wg = W.reshape(-1, gs) if gs else W
    lo, hi = Wg.min(1, keepdim=True).values.clamp(max=0), Wg.max(1, keepdim=True).values.clamp(min=0)
    s = (hi - lo) / (2 ** bit - 1)
    z = torch.clamp(torch.round(-2 ** (bit - 1) - lo / s), -2 ** (bit - 1), 2 ** (bit - 1) - 1)
    return ((torch.clamp(torch.round(Wg / s) + z, -2 ** (bit - 1), 2 ** (bit - 1) - 1) - z) * s).reshape(shape)


def _layer(kind, seed=0, rows=48, cols=64, tokens=256):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    if kind == "input_outliers":  # a few huge weight columns (on weak inputs) stretch every row's grid
        W[:, :4] *= 30
        X[:, :4] *= 0.05
    else:                         # rows of very different magnitude, inputs with a few strong channels
        W *= torch.logspace(-2, 1, rows, dtype=torch.float64)[:, None]
        X[:, :4] *= 10
    return W, X


@pytest.mark.parametrize("kind", ["input_outliers", "row_scales"])
@pytest.mark.parametrize("gs", [None, 16])
def test_picks_the_dimension_of_the_smaller_output_error(kind, gs):
    W, X = _layer(kind)
    ref = X @ W.T
    oc = ((X @ _rtn_rows(W, 3, gs).T - ref) ** 2).mean().item()
    ic = ((X @ _rtn_rows(W.T.contiguous(), 3, gs).T.T - ref) ** 2).mean().item()
    expect = 0 if ic < oc else 1
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group" if gs else "per_channel",
                     group_size=gs or -1)
    err = axis_errors(W.float(), (X.T @ X).float(), args)
    assert (0 if err[0] < err[1] else 1) == expect
    # the errors are the summed squared output errors
    n = X.shape[0] * W.shape[0]
    assert err[1] / n == pytest.approx(oc, rel=1e-3) and err[0] / n == pytest.approx(ic, rel=1e-3)
    assert expect == (0 if kind == "input_outliers" else 1)  # both answers occur: the test can tell them apart


def _adadim_config(make_config, wiki_files, tmp_path, weight=None, special=None, save=None, name="adadim.yml"):
    """llmc's equivalent of LLMC's methods/AdaDim/adadim_w_a.yml (W8A8 there; 4-bit weights here so that the
    two grids differ visibly on the tiny model)."""
    weight = {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1, **(weight or {})}
    return make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 64,
                                  "bs": 4},
                        "eval": {"eval_pos": ["pretrain", "fake_quant"], "num_samples": 2},
                        "quant": {"method": "AdaDim", "weight": weight, "special": special or {}, "quant_out": True,
                                  "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}},
                        "save": {"save_path": str(tmp_path / "adadim"), **(save or {})}}, name=name)


def test_llmc_config_runs_end_to_end(make_config, wiki_files, tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from llmc.export.save import load_fake_quant
    from llmc.quant.quantizer import fake_quant

    path = _adadim_config(make_config, wiki_files, tmp_path, save={"save_fake": True})
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0
    float_model = AutoModelForCausalLM.from_pretrained(tiny_dir())
    fake = load_fake_quant(tmp_path / "adadim" / "fake_quant_model")
    args = QuantArgs(bit=4, symmetric=True, granularity="per_channel")
    chosen = []
    for name, module in float_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        w = module.weight.detach()
        got = fake.get_submodule(name).weight.detach()
        along_out, along_in = fake_quant(w, args), fake_quant(w.T, args).T
        assert torch.equal(got, along_out) or torch.equal(got, along_in), name
        chosen.append(torch.equal(got, along_in))
    assert len(chosen) == 21


@pytest.mark.parametrize("weight, special, save, key", [
    ({"granularity": "per_tensor"}, {}, {}, "quant.weight.granularity"),
    ({}, {"axis": 0}, {}, "axis"),
    ({}, {}, {"save_vllm": True}, "save.save_vllm"),
])
def test_bad_settings_are_refused_before_loading(make_config, wiki_files, tmp_path, weight, special, save, key):
    from llmc.config.checks import check_config
    from llmc.config.loader import load_config
    from llmc.errors import ConfigError

    path = _adadim_config(make_config, wiki_files, tmp_path, weight, special, save)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(path))
    assert key in str(err.value), str(err.value)


def test_groups_must_divide_output_channels(make_config, wiki_files, tmp_path, capsys):
    path = _adadim_config(make_config, wiki_files, tmp_path, {"granularity": "per_group", "group_size": 48})
    assert main(["--config", path, "--dry-run"]) == 2
    assert "quant.weight.group_size" in capsys.readouterr().err
