"""HQQ: the half-quadratic step against the paper's formulas, its error against RTN, LLMC's round_zp,
axis 0 grids, and the refusals of what packed exports cannot store."""
import pytest
import torch
from safetensors.torch import load_file

from llmc.algorithms.hqq import HQQOptions, hqq_step, hqq_zeros, shrink_lp
from llmc.cli import main
from llmc.quant.quantizer import QuantArgs, calibrate, dequantize, fake_quant, grouped, quantize


def _heavy_tailed(rows=128, cols=256, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("p", [0.7, 1.0])
def test_one_iteration_equals_the_papers_formulas(p):
    """W_q = clamp(round(W/s + z)), W_r = (W_q - z)s, W_e = sign(e)·relu(|e| - |e|^(p-1)/β) with e = W - W_r,
    z' = mean(W_q - (W - W_e)/s) per group, written out in float64."""
    torch.manual_seed(1)
    w = torch.randn(6, 8)
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=4, round_zp=False)
    wg = grouped(w, args)
    scale, zero = calibrate(wg, args)
    beta = 7.0
    new_zero, w_r = hqq_step(wg, scale, zero, args, beta, p)

    W, s, z = wg.double(), scale.double(), zero.double()
    W_q = torch.clamp(torch.floor(W / s + z + 0.5), -4, 3)
    W_r = (W_q - z) * s
    e = W - W_r
    W_e = torch.sign(e) * torch.clamp(e.abs() - e.abs() ** (p - 1) / beta, min=0)
    expect = (W_q - (W - W_e) / s).mean(dim=1, keepdim=True)
    torch.testing.assert_close(w_r.double(), W_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_zero.double(), expect, rtol=0, atol=1e-5)
    assert not torch.equal(new_zero, zero)  # the step moves the zero points
    # the shrinkage operator on its own, including 0 (|0|^(p-1) is infinite: the output is 0)
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    expect = torch.sign(x.double()) * torch.clamp(x.double().abs() - x.double().abs() ** (p - 1) / beta, min=0)
    torch.testing.assert_close(shrink_lp(x, beta, p).double(), expect.nan_to_num(0.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bit", [4, 3])
def test_reconstruction_error_below_rtn_on_heavy_tailed_weights(bit):
    w = _heavy_tailed()
    rtn_args = QuantArgs(bit=bit, symmetric=False, granularity="per_group", group_size=64)
    rtn = fake_quant(w, rtn_args)
    for round_zp in (False, True):
        args = QuantArgs(bit=bit, symmetric=False, granularity="per_group", group_size=64, round_zp=round_zp)
        wg = grouped(w, args)
        scale, zero = calibrate(wg, args)
        z = hqq_zeros(wg, scale, zero, args, HQQOptions())
        hqq = dequantize(quantize(wg, scale, z, args), scale, z).reshape(w.shape)
        l1_rtn, l1_hqq = (w - rtn).abs().mean(), (w - hqq).abs().mean()
        if round_zp:  # integer zero points: never worse than RTN (its grid is where HQQ starts)
            assert torch.equal(z, z.round()) and l1_hqq <= l1_rtn
        else:  # float zero points: measurably better, in L1 and in MSE
            assert l1_hqq < 0.97 * l1_rtn, (l1_hqq, l1_rtn)
            assert (w - hqq).pow(2).mean() < (w - rtn).pow(2).mean()


def test_float_zero_points_follow_llmcs_formula():
    """round_zp: False (LLMC): zero = qmin - min/scale unrounded, codes clamp(round(x/scale + zero))."""
    w = _heavy_tailed(4, 32)
    args = QuantArgs(bit=4, symmetric=False, granularity="per_channel", round_zp=False)
    scale, zero = calibrate(grouped(w, args), args)
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / 15)
    torch.testing.assert_close(zero, -8 - lo / scale)
    assert not torch.equal(zero, zero.round())
    expect = (torch.clamp(torch.round(w / scale + zero), -8, 7) - zero) * scale
    torch.testing.assert_close(fake_quant(w, args), expect, rtol=0, atol=0)


def _hqq_config(make_config, tmp_path, special, weight=None, save=None, name="hqq.yml"):
    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32, "round_zp": False,
              **(weight or {})}
    return make_config({"quant": {"method": "HQQ", "weight": weight, "special": special},
                        "save": {"save_path": str(tmp_path / "out"), **(save or {})}}, name=name)


def test_llmc_style_config_runs_and_groups_run_along_output_channels(make_config, tmp_path):
    """LLMC's HQQ config (axis 0, lp_norm 0.7, float zero points) end to end; in the saved fake-quant model each
    group of 32 output channels of one input column holds at most 16 values, an input-column group does not."""
    special = {"axis": 0, "lp_norm": 0.7, "beta": 10, "kappa": 1.01, "iters": 20}
    path = _hqq_config(make_config, tmp_path, special, save={"save_fake": True})
    assert main(["--config", path]) == 0
    state = load_file(str(tmp_path / "out" / "fake_quant_model" / "model.safetensors"))
    w = state["model.layers.0.mlp.down_proj.weight"]  # [64, 128]
    along_out = [len(torch.unique(g)) for g in w.T.reshape(-1, 32)]
    along_in = [len(torch.unique(g)) for g in w.reshape(-1, 32)]
    assert max(along_out) <= 16 < max(along_in)


def test_axis_1_round_zp_true_saves_an_exportable_grid(make_config, tmp_path):
    path = _hqq_config(make_config, tmp_path, {"axis": 1}, weight={"round_zp": True}, save={"save_gptq": True})
    assert main(["--config", path]) == 0
    assert (tmp_path / "out" / "gptq_quant_model" / "config.json").is_file()


@pytest.mark.parametrize("special, weight, save, words", [
    ({"axis": 1}, {}, {"save_gptq": True}, ["save.save_gptq", "float zero points", "round_zp"]),
    ({"axis": 0}, {"round_zp": True}, {"save_vllm": True}, ["save.save_vllm", "axis: 0"]),
    ({"axis": 1}, {"symmetric": True, "round_zp": True}, {}, ["quant.weight.symmetric", "asymmetric"]),
    ({"lp_norm": 1.5}, {}, {}, ["quant.special.lp_norm"]),
    ({"axis": 2}, {}, {}, ["quant.special.axis"]),
    ({"axis": 0, "iters": 1}, {"group_size": 64}, {}, ["quant.weight.group_size", "out_features 32"]),
])
def test_refusals_before_loading(make_config, tmp_path, capsys, special, weight, save, words):
    path = _hqq_config(make_config, tmp_path, special, weight, save)
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_round_zp_false_needs_an_asymmetric_grid(make_config, tmp_path, capsys):
    path = make_config({"quant": {"weight": {"symmetric": True, "round_zp": False}}})
    assert main(["--config", path]) == 2
    assert "round_zp" in capsys.readouterr().err
