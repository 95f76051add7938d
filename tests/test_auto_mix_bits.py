"""quant.auto_mix_bits: per-linear widths chosen per block by output error per bit, under an average budget.
The widths a run picks are recomputed here from the float model with a quantizer and a greedy choice written
in the test; the refusals name their key."""
import json

import pytest
import torch

from llmc.cli import main

G = 32
WEIGHT = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": G}
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _config(make_config, wiki_files, tmp_path, auto, method="RTN", save=None, extra=None):
    quant = {"method": method, "weight": WEIGHT, "auto_mix_bits": auto, **(extra or {})}
    return make_config({"calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 8, "seq_len": 64,
                                  "bs": 4},
                        "eval": {"eval_pos": ["fake_quant"], "num_samples": 2}, "quant": quant,
                        "save": {"save_path": str(tmp_path / "out"), **(save or {"save_fake": True})}})


def _rtn(w: torch.Tensor, bit: int) -> torch.Tensor:
    """Asymmetric round-to-nearest per group of G on the signed grid [-2^(b-1), 2^(b-1)-1]."""
    qmin, qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1
    g = w.reshape(-1, G)
    lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (qmax - qmin)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return ((torch.clamp(torch.round(g / scale) + zero, qmin, qmax) - zero) * scale).reshape(w.shape)


def _bits(bit: int, out: int, inp: int) -> int:
    return out * inp * bit + out * inp // G * (16 + bit)  # codes, a float16 scale and a bit-wide zero per group


def _expected_widths(model, batches, options, avg_bits):
    """Each block fed float inputs (RTN: quant_out False): per linear and option, the block's summed squared
    output error with only that linear quantized; then the greedy upgrades by error per bit in the block's
    share of what the budget has left."""
    layers = model.model.layers
    outputs = {}

    def run() -> list:
        got = {i: [] for i in range(len(layers))}
        hooks = [layer.register_forward_hook(lambda m, a, out, i=i: got[i].append(out[0] if isinstance(out, tuple)
                                                                                  else out))
                 for i, layer in enumerate(layers)]
        with torch.no_grad():
            for ids in batches:
                model(ids)
        for h in hooks:
            h.remove()
        return got

    reference = run()
    shapes = [[layers[b].get_submodule(n).weight.shape for n in NAMES] for b in range(len(layers))]
    weights_left = sum(o * i for block in shapes for o, i in block)
    bits_left = avg_bits * weights_left
    widths = {}
    for b, layer in enumerate(layers):
        err = torch.zeros(len(NAMES), len(options), dtype=torch.float64)
        for j, name in enumerate(NAMES):
            lin = layer.get_submodule(name)
            original = lin.weight.data
            for k, bit in enumerate(options):
                lin.weight.data = _rtn(original, bit)
                outs = run()[b]
                lin.weight.data = original
                err[j, k] = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, reference[b]))
        cost = [[_bits(bit, o, i) for bit in options] for o, i in shapes[b]]
        weights = sum(o * i for o, i in shapes[b])
        share = bits_left * weights / weights_left
        level = [0] * len(NAMES)
        spare = share - sum(c[0] for c in cost)
        while True:
            ups = [((err[j, level[j]] - err[j, k]).item() / (cost[j][k] - cost[j][level[j]]), j, k)
                   for j in range(len(NAMES)) for k in range(level[j] + 1, len(options))
                   if cost[j][k] - cost[j][level[j]] <= spare and err[j, level[j]] > err[j, k]]
            if not ups:
                break
            _, j, k = max(ups, key=lambda u: u[0])
            spare -= cost[j][k] - cost[j][level[j]]
            level[j] = k
        for j, name in enumerate(NAMES):
            widths[f"model.layers.{b}.{name}"] = options[level[j]]
        bits_left -= share - spare
        weights_left -= weights
    return widths


@pytest.mark.parametrize("n_samples, avg_bits", [(None, 3.4), (4, 2.8)])
def test_widths_follow_output_error_per_bit_within_the_budget(make_config, wiki_files, tmp_path, tiny_dir, n_samples,
                                                              avg_bits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.config.loader import load_config
    from llmc.data import batch_samples, load_calib_samples
    from llmc.export.save import load_fake_quant

    auto = {"avg_bits": avg_bits, "options": [2, 4], **({"n_samples": n_samples} if n_samples else {})}
    path = _config(make_config, wiki_files, tmp_path, auto, save={"save_fake": True, "save_vllm": True})
    assert main(["--config", path]) == 0
    fake = load_fake_quant(tmp_path / "out" / "fake_quant_model")
    got = {}
    for name, module in fake.named_modules():
        if name.split(".")[-1] in {n.split(".")[-1] for n in NAMES} and "layers" in name:
            levels = max(len(torch.unique(g)) for g in module.weight.detach().reshape(-1, G))
            got[name] = 2 if levels <= 4 else 4
    config = load_config(path)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir()).float().eval()
    batches = batch_samples(load_calib_samples(config.calib, AutoTokenizer.from_pretrained(tiny_dir())), 4)
    want = _expected_widths(model, batches[:1] if n_samples else batches, [2, 4], avg_bits)  # bs 4: one batch
    assert got == want
    if n_samples:  # the samples measured decide: at this budget all of them choose otherwise
        assert want != _expected_widths(model, batches, [2, 4], avg_bits)
    assert set(got.values()) == {2, 4}  # the budget buys some upgrades, not all
    avg = json.loads((tmp_path / "out" / "results.json").read_text())["avg_bits"]
    assert _bits(2, 1, G) / G < avg <= avg_bits + 1e-9
    # compressed-tensors: one config group per width, naming its linears
    qc = json.loads((tmp_path / "out" / "vllm_quant_model" / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert groups == {b: sorted(n for n, w in got.items() if w == b) for b in (2, 4)}


def test_dry_run_states_the_budget(make_config, wiki_files, tmp_path, capsys):
    path = _config(make_config, wiki_files, tmp_path, {"avg_bits": 3.0, "options": [4, 2, 3], "n_samples": 4})
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "auto_mix_bits: each linear 2 or 3 or 4 bits, 3.0 bits per weight on average, chosen per block on 4 " \
           "calibration samples" in out


@pytest.mark.parametrize("auto, method, save, extra, words", [
    ({"avg_bits": 5.0, "options": [2, 4]}, "RTN", None, None,
     ["quant.auto_mix_bits.avg_bits", "5.0", "from 2.562 (all 2-bit) to 4.625 bits"]),
    ({"avg_bits": 3.0, "options": [4]}, "RTN", None, None, ["auto_mix_bits.options", "at least two"]),
    ({"avg_bits": 3.0, "options": [2, 9]}, "RTN", None, None, ["auto_mix_bits.options", "from 2 to 8"]),
    ({"avg_bits": 3.0, "options": [2, 4]}, "QuaRot", None, None, ["quant.auto_mix_bits", "Quarot", "available with"]),
    ({"avg_bits": 3.0, "options": [2, 4]}, "RTN", {"save_gptq": True}, None, ["save.save_gptq"]),
    ({"avg_bits": 3.0, "options": [2, 4]}, "RTN", None,
     {"mix_bits": {"setting_0": {"layer_name": ["o_proj"], "do_quant": False}}}, ["quant.auto_mix_bits", "not both"]),
])
def test_bad_budgets_are_refused_before_loading(make_config, wiki_files, tmp_path, capsys, auto, method, save,
                                                 extra, words):
    path = _config(make_config, wiki_files, tmp_path, auto, method, save, extra)
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
