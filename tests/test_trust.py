"""No silent corruption: a checkpoint under another family's adapter, a fold that changes the float model,
non-finite weights or activations, inputs that cannot serve: each stops the run with a message naming
what is wrong, before work where it can be known before work, and leaves the inputs untouched."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, OPTConfig, Phi3Config

from llmc.algorithms.awq import Awq, AwqOptions
from llmc.cli import main
from llmc.engine.context import RunContext
from llmc.engine.guard import FoldMismatchError
from llmc.engine.pipeline import quantize_blocks
from llmc.models.adapter import adapter_class
from llmc.models.llama import Llama
from llmc.models.opt import Opt
from llmc.quant.fake_linear import quant_disabled
from llmc.quant.quantizer import QuantArgs
from llmc.registry import ADAPTERS
from tiny import VOCAB, make_tokenizer

W3 = QuantArgs(bit=3, symmetric=False, granularity="per_group", group_size=32)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _build(config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)  # a norm scale far from 1: a wrong fold cannot hide
    return model


def _save(model, path: Path) -> str:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def _gemma():
    return _build(GemmaConfig(head_dim=16, **SMALL))


def _post_ln_opt():
    return _build(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=False))


def _batches(n=2, seq=32):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n)]


def _digest(paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error was reported")

    monkeypatch.setattr("llmc.run.load_model", refuse)
    monkeypatch.setattr("llmc.run.load_model_streamed", refuse)


# ---- a declared family must be the checkpoint's ------------------------------------------------------
@pytest.mark.parametrize("build,declared,found", [(_gemma, "llama", "gemma"),
                                                  (lambda: _build(Phi3Config(pad_token_id=0, **SMALL)), "llama",
                                                   "phi3")])
@pytest.mark.parametrize("dry", [False, True])
def test_declared_type_of_another_family_is_refused_before_loading(build, declared, found, dry, tmp_path, make_config,
                                                                  capsys, monkeypatch):
    path = _save(build(), tmp_path / "ckpt")
    _no_weights(monkeypatch)
    cfg = make_config({"model": {"path": path, "type": declared}})
    code = main(["--config", cfg] + (["--dry-run"] if dry else []))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "model.type" in err and f"'{declared}'" in err and f"'{found}'" in err


@pytest.mark.parametrize("spelling", ["Llama", "LLAMA", "llama", "Smollm"])
def test_llmc_spellings_of_the_checkpoint_family_are_accepted(spelling):
    assert adapter_class("llama", spelling) is Llama


@pytest.mark.parametrize("spelling,model_type", [("Qwen2", "llama"), ("Mistral", "llama"), ("Llama", "mistral")])
def test_other_spellings_are_refused(spelling, model_type):
    with pytest.raises(Exception, match="does not match"):
        adapter_class(model_type, spelling)


# ---- the fold guard ----------------------------------------------------------------------------------
def _awq(model, adapter, check=True, **opts):
    ctx = RunContext(check_folds=check)
    return quantize_blocks(model, adapter, Awq(W3, None, AwqOptions(weight_clip=False, **opts)), _batches(), set(),
                           ctx, quant_out=True)


def test_fold_guard_stops_a_family_whose_norm_cannot_absorb_the_scale(monkeypatch):
    """Gemma's RMSNorm multiplies by 1 + w: run under Llama's declaration, AWQ's fold changes the model.
    The guard stops at the first block, naming it and the subset; without it the float model changes."""
    monkeypatch.setitem(ADAPTERS._entries, "gemma", Llama)
    model = _gemma()
    with pytest.raises(FoldMismatchError, match=r"model\.layers\.0: after folding input_layernorm -> self_attn"):
        _awq(model, Llama(model))
    model, ids = _gemma(), _batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    _awq(model, Llama(model), check=False)
    with torch.no_grad(), quant_disabled(model):
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)  # what the guard prevents


def test_post_layernorm_opt_keeps_the_float_model():
    """OPT-350m's layout (do_layer_norm_before: False): the norms sit after the residual sums, so the
    subsets behind them take no fold; v→o and fc1→fc2 still do, and the float model is unchanged."""
    model, ids = _post_ln_opt(), _batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    adapter = adapter_class("opt", None)(model)
    state = _awq(model, adapter)
    assert "model.decoder.layers.0.fc2" in state["scales"]
    assert "model.decoder.layers.0.fc1" not in state["scales"]
    assert "model.decoder.layers.0.self_attn.q_proj" not in state["scales"]
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_fold_guard_catches_post_layernorm_declared_as_pre_layernorm(monkeypatch):
    model = _post_ln_opt()
    adapter = adapter_class("opt", None)(model)
    adapter.subsets = Opt.subsets  # the pre-LN declaration: what llmc did before
    with pytest.raises(FoldMismatchError, match=r"model\.decoder\.layers\.0: after folding self_attn_layer_norm"):
        _awq(model, adapter)


def test_fold_guard_passes_exact_folds_in_every_family():
    from tiny import FAMILIES, make_model

    for family in FAMILIES:
        model = make_model(family)
        _awq(model, adapter_class(model.config.model_type, None)(model), trans_version="v1")


# ---- NaN and Inf -------------------------------------------------------------------------------------
def _tiny_with(tmp_path, edit) -> str:
    from tiny import make_model

    model = make_model("llama")
    with torch.no_grad():
        edit(model)
    return _save(model, tmp_path / "edited")


def test_non_finite_weight_stops_at_load_naming_the_tensor(tmp_path, make_config, capsys):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")

    cfg = make_config({"model": {"path": _tiny_with(tmp_path, poison)}, "save": {"save_fake": True}})
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "1 NaN" in err
    assert not (tmp_path / "out" / "fake_quant_model").exists()


@pytest.mark.parametrize("method", ["GPTQ", "Awq"])
def test_activation_overflow_is_named_where_it_appears(method, tmp_path, make_config, wiki_files, capsys):
    """Finite weights whose product overflows in block 1: the run names block 1's float outputs, not a
    Hessian or a search of a later layer."""
    def overflow(model):
        model.model.layers[1].post_attention_layernorm.weight.fill_(1e30)  # gate · up overflows float32

    cfg = make_config({"model": {"path": _tiny_with(tmp_path, overflow)},
                       "calib": {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32},
                       "quant": {"method": method}, "eval": {"eval_pos": ["fake_quant"]}})
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "the float outputs of model.layers.1" in err and "Inf" in err


# ---- bad input: refused before the model loads, inputs untouched ---------------------------------------
def _refused(cfg_path, words, capsys, monkeypatch, inputs=()):
    _no_weights(monkeypatch)
    before = _digest([cfg_path, *inputs])
    assert main(["--config", cfg_path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} missing from {err}"
    assert _digest([cfg_path, *inputs]) == before


def test_save_path_that_is_a_file(tmp_path, make_config, capsys, monkeypatch):
    f = tmp_path / "taken"
    f.write_text("keep me")
    _refused(make_config({"save": {"save_path": str(f)}}), ["save.save_path", "existing file"], capsys, monkeypatch,
             [f])
    _refused(make_config({"save": {"save_path": str(f / "sub"), "checkpoint": False}}),
             ["save.save_path", "is a file"], capsys, monkeypatch, [f])


@pytest.mark.parametrize("text", ["", " = Title = \n\n"])
def test_empty_or_short_calibration_file(text, tmp_path, make_config, capsys, monkeypatch):
    f = tmp_path / "calib.txt"
    f.write_text(text)
    cfg = make_config({"calib": {"name": "wikitext2", "path": str(f), "n_samples": 4, "seq_len": 64},
                       "quant": {"method": "GPTQ"}})
    _refused(cfg, ["calib"], capsys, monkeypatch, [f])


def test_evaluation_text_shorter_than_one_window(tmp_path, make_config, capsys, monkeypatch):
    f = tmp_path / "short.raw"
    f.write_text(" = Short = \n a few words \n")
    _refused(make_config({"eval": {"path": str(f), "seq_len": 256}}), ["eval.seq_len", "256", "fewer than one window"],
             capsys, monkeypatch, [f])


@pytest.mark.parametrize("changes,words", [
    ({"quant": {"act": {"bit": 8, "granularity": "per_head", "head_num": 3}}}, ["quant.act.head_num", "3", "64"]),
    ({"quant": {"special": {"not_an_option": 1}}}, ["quant.special.not_an_option", "unknown key"]),
    ({"quant": {"method": "GPTQ", "special": {"actordr": True}}},  # the algorithm's options, not the sections
     ["quant.special.actordr", "Did you mean 'actorder'", "Allowed here: actorder", "percdamp"]),
    ({"quant": {"weight": {"ste": True}}}, ["quant.weight.ste", "RTN"]),
    ({"quant": {"method": "SmoothQuant", "act": {"bit": 8, "granularity": "per_token"},
                "special": {"alpha": 0.7, "alpha_min": 0.3}}}, ["quant.special.alpha_min", "alpha_search"]),
    ({"quant": {"weight": {"head_num": 4}}}, ["quant.weight", "head_num", "per_head"]),
    ({"quant": {"weight": {"bit": "e4m3", "symmetric": False, "granularity": "per_channel", "group_size": -1}}},
     ["quant.weight", "e4m3", "symmetric"]),
])
def test_keys_without_effect_or_invalid_are_refused(changes, words, make_config, capsys, monkeypatch):
    _refused(make_config(changes), words, capsys, monkeypatch)


def test_kvcache_only_in_the_last_stage(make_config, capsys, monkeypatch):
    rtn = {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}}
    cfg = make_config({"quant": None, "stages": [{**rtn, "kvcache": {"bit": 8}}, rtn]})
    _refused(cfg, ["stages.0.kvcache", "last stage"], capsys, monkeypatch)


# ---- seeds ---------------------------------------------------------------------------------------------
def test_base_seed_draws_the_calibration_samples_unless_calib_seed_is_given(make_config, wiki_files):
    from llmc.config import load_config
    from llmc.data import load_calib_samples

    calib = {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 16}
    samples = {}
    for seed, extra in ((0, {}), (12345, {}), (12345, {"seed": 0})):
        cfg = load_config(make_config({"base": {"seed": seed}, "calib": {**calib, **extra},
                                       "quant": {"method": "GPTQ"}}, name=f"s{seed}{len(extra)}.yml"))
        samples[(seed, bool(extra))] = torch.cat(load_calib_samples(cfg.calib, make_tokenizer()))
    assert not torch.equal(samples[(0, False)], samples[(12345, False)])
    assert torch.equal(samples[(0, False)], samples[(12345, True)])


# ---- failures leave nothing that blocks the next run ----------------------------------------------------
def test_failure_before_the_first_block_leaves_no_checkpoint(make_config, tmp_path, monkeypatch):
    cfg = make_config({"save": {"save_fake": True}})

    def boom(*a, **k):
        raise RuntimeError("killed before the first block")

    with monkeypatch.context() as m:
        m.setattr("llmc.run.quantize_blocks", boom)
        with pytest.raises(RuntimeError):
            main(["--config", cfg])
    out = tmp_path / "out"
    assert not (out / ".llmc_resume").exists()
    assert main(["--config", cfg]) == 0  # the identical run starts and finishes
    assert (out / "fake_quant_model").is_dir()


# ---- KV-cache quantization travels with the fake-quant model --------------------------------------------
def test_fake_quant_model_reloads_with_its_kv_cache_quantization(make_config, tmp_path, wiki_files):
    from llmc.data import load_eval_text
    from llmc.evaluation.ppl import eval_windows
    from llmc.export.save import load_fake_quant

    cfg = make_config({"quant": {"kvcache": {"bit": 2, "symmetric": False}}, "save": {"save_fake": True},
                       "eval": {"eval_pos": ["fake_quant", "fake_quant_wo_kv"]}})
    assert main(["--config", cfg]) == 0
    out = tmp_path / "out"
    ppl = {e["pos"]: e["ppl"] for e in json.loads((out / "results.json").read_text())["evals"]}
    model = load_fake_quant(out / "fake_quant_model")
    windows = eval_windows(make_tokenizer(), load_eval_text("wikitext2", wiki_files["test"], False), 64, 4)
    with torch.no_grad():  # perplexity written out here: mean NLL per window, exp of the mean
        logits = model(windows).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    reloaded = torch.exp(nll.mean()).item()
    assert reloaded == pytest.approx(ppl["fake_quant"], rel=1e-4)
    assert abs(ppl["fake_quant"] - ppl["fake_quant_wo_kv"]) > 1e-3 * ppl["fake_quant"]  # 2-bit KV does matter
