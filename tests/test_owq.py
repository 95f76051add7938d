"""OWQ (GPTQ with owq: True): the weak columns are the top n_out by the paper's sensitivity, stay float
(bit for bit where no GPTQ update reaches them), the others lie on the grid; LLMC-style config end to end."""
import pytest
import torch

from llmc.algorithms.gptq import GPTQOptions, gptq_quantize, weak_columns
from llmc.cli import main
from llmc.quant.fake_linear import QuantLinear
from llmc.quant.quantizer import QuantArgs


def _layer(seed=0, rows=24, cols=64, diagonal=False):
    torch.manual_seed(seed)
    W = torch.randn(rows, cols) * 0.1
    X = torch.randn(512, cols)
    X[:, [3, 17, 40]] *= 12  # outlier input features
    if diagonal:  # independent inputs: H is diagonal, so GPTQ's updates never reach another column
        H = torch.diag(2 * X.pow(2).mean(0))
    else:
        X[:, 1:] += 0.5 * X[:, :-1]
        H = 2 * X.T @ X / X.shape[0]
    return W, H, X


def _rtn_per_channel(W, bit):
    """Asymmetric per-row RTN on the signed grid, written out: range widened to include 0."""
    lo, hi = W.amin(1, keepdim=True).clamp(max=0), W.amax(1, keepdim=True).clamp(min=0)
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    scale = (hi - lo) / (qmax - qmin)
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return (torch.clamp(torch.round(W / scale) + zero, qmin, qmax) - zero) * scale


def _on_grid(Q, scale, zero, g_idx, cols, args):
    s, z = scale[:, g_idx[cols]], zero[:, g_idx[cols]]
    code = Q[:, cols] / s + z
    return torch.allclose(code, code.round(), atol=1e-3) and code.min() >= args.qmin - 1e-3 \
        and code.max() <= args.qmax + 1e-3


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("gran", ["per_group", "per_channel"])
def test_weak_columns_are_the_most_sensitive_and_stay_float(gran, actorder):
    W, H, _ = _layer(diagonal=True)
    args = QuantArgs(bit=3, symmetric=False, granularity=gran, group_size=16 if gran == "per_group" else -1)
    n_out = 5
    sensitivity = torch.diag(H) * (W - _rtn_per_channel(W, 3)).pow(2).sum(0)
    expect = sorted(torch.topk(sensitivity, n_out).indices.tolist())
    keep = weak_columns(W, H, n_out, args)
    assert keep.tolist() == expect
    assert {3, 17, 40} <= set(expect)
    Q, scale, zero, g_idx = gptq_quantize(W, H.clone(), args, GPTQOptions(actorder=actorder), keep=keep)
    assert torch.equal(Q[:, keep], W[:, keep])  # float, bit for bit (no update reaches them with a diagonal H)
    rest = torch.tensor([c for c in range(W.shape[1]) if c not in expect])
    if g_idx is None:
        g_idx = torch.zeros(W.shape[1], dtype=torch.long)
    assert _on_grid(Q, scale.reshape(W.shape[0], -1), zero.reshape(W.shape[0], -1), g_idx, rest, args)
    assert not _on_grid(Q, scale.reshape(W.shape[0], -1), zero.reshape(W.shape[0], -1), g_idx, keep, args)
    # LLMC's ranking: the Hessian diagonal alone
    hessian_only = weak_columns(W, H, n_out, args, "hessian")
    assert hessian_only.tolist() == sorted(torch.topk(torch.diag(H), n_out).indices.tolist())


def test_fake_quant_linear_keeps_the_columns_float_and_owq_beats_gptq():
    """With a full Hessian the weak columns take GPTQ's compensation (OWQ's design); the QuantLinear's
    fake weight holds them exactly, and the layer's output error falls below plain GPTQ's."""
    W, H, X = _layer()
    args = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=16)
    keep = weak_columns(W, H, 4, args)
    Q, scale, zero, g_idx = gptq_quantize(W, H.clone(), args, GPTQOptions(), keep=keep)
    q = QuantLinear(torch.nn.Linear(64, 24, bias=False), args)
    q.weight.data.copy_(Q)
    q.set_weight_qparams(scale, zero, g_idx, float_cols=keep)
    fake = q.fake_weight()
    assert torch.equal(fake[:, keep], Q[:, keep])
    assert torch.equal(fake, Q)
    Q0, *_ = gptq_quantize(W, H.clone(), args, GPTQOptions())
    err = lambda w: (X @ (W - w).T).pow(2).mean()  # noqa: E731
    assert err(Q) < 0.8 * err(Q0)


def _owq_config(make_config, wiki_files, tmp_path, special, save=None):
    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 32, "bs": 4}
    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
    base = {"actorder": False, "static_groups": False, "percdamp": 0.01, "blocksize": 128, "true_sequential": True}
    return make_config({"calib": calib, "quant": {"method": "GPTQ", "weight": weight, "special": {**base, **special},
                                                  "quant_out": True},
                        "save": {"save_path": str(tmp_path / "out"), **(save or {})}})


def test_llmc_style_owq_config_runs(make_config, wiki_files, tmp_path):
    from llmc.export.save import load_fake_quant

    path = _owq_config(make_config, wiki_files, tmp_path, {"owq": True, "n_outs": [2, 2, 2, 2, 1, 1, 4]},
                       {"save_fake": True})
    assert main(["--config", path]) == 0
    model = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    assert torch.isfinite(model.model.layers[0].mlp.down_proj.weight).all()


@pytest.mark.parametrize("special, save, words", [
    ({"owq": True, "n_outs": [2, 2]}, {}, ["quant.special.n_outs", "7 linears"]),
    ({"owq": True, "n_outs": 64}, {}, ["quant.special.n_outs", "64 float columns", "expected fewer"]),
    ({"owq": True, "n_outs": 2, "static_groups": True}, {}, ["quant.special.static_groups"]),
    ({"n_outs": 2}, {}, ["quant.special.n_outs", "without owq"]),
    ({"owq": True, "n_outs": 2}, {"save_gptq": True}, ["save.save_gptq", "OWQ"]),
])
def test_owq_refusals_before_loading(make_config, wiki_files, tmp_path, capsys, special, save, words):
    path = _owq_config(make_config, wiki_files, tmp_path, special, save)
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
