"""AWQ's clips handed to TesseraQ or OmniQuant fit only the grid they were searched on: a later stage (or a run
reading a clip file) that groups a linear otherwise is refused before any weight loads, naming the linear and
both groupings; matching grids (mix_bits included) pass."""
import pytest

from llmc.cli import main

G32 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32, "calib_algo": "learnable"}
G16 = {**G32, "group_size": 16}


def _calib(wiki_files):
    return {"name": "wikitext2", "path": wiki_files["valid"], "n_samples": 4, "seq_len": 32, "bs": 2}


def _awq(weight, **special):
    return {"method": "Awq", "weight": weight, "quant_out": True,
            "special": {"trans_version": "v2", "clip_sym": False, **special}}


def _tesseraq(weight, mix=None, **special):
    stage = {"method": "TesseraQ", "weight": {**weight, "ste": True}, "quant_out": True,
             "special": {"iterations": 1, "thresholds": [0.5], "batch_size": 2, "load_transform": True,
                         "weight_clip": True, "clip_version": "v2", **special}}
    return {**stage, "mix_bits": mix} if mix else stage


def _omniquant(weight, **special):
    return {"method": "OmniQuant", "weight": {**weight, "ste": True}, "quant_out": True,
            "special": {"lwc": True, "let": False, "epochs": 1, "load_clip": True, **special}}


def _stages(make_config, wiki_files, tmp_path, DELETE, stages, name="stages.yml"):
    return make_config({"calib": _calib(wiki_files), "eval": DELETE, "quant": DELETE, "stages": stages,
                        "save": {"save_path": str(tmp_path / name[:-4]), "save_fake": True}}, name=name)


# down_proj of block 1 on groups of 16 in the later stage only
MIX16 = {"setting_0": {"layer_name": ["down_proj#1"], "do_quant": True, "weight": G16}}


@pytest.mark.parametrize("stages, linear", [
    ([_awq(G32), _tesseraq(G16)], "model.layers.0.self_attn.v_proj"),
    ([_awq(G32), _omniquant(G16)], "model.layers.0.self_attn.v_proj"),
    ([_awq(G32), _tesseraq(G32, MIX16)], "model.layers.1.mlp.down_proj"),
])
def test_clips_in_memory_on_another_grid_are_refused_before_loading(make_config, wiki_files, tmp_path, DELETE, capsys,
                                                                    stages, linear):
    path = _stages(make_config, wiki_files, tmp_path, DELETE, stages)
    assert main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages.1.weight" in err and linear in err and "stage 0 (Awq)" in err, err
    assert main(["--config", path]) == 2
    assert not (tmp_path / "stages").exists()  # refused before the output folder (and any weight)


def test_clips_in_memory_on_the_same_grids_pass(make_config, wiki_files, tmp_path, DELETE):
    """The same mix_bits in both stages: every linear's clips were searched on the grid it is quantized on."""
    awq = {**_awq(G32), "mix_bits": MIX16}
    path = _stages(make_config, wiki_files, tmp_path, DELETE, [awq, _tesseraq(G32, MIX16)])
    assert main(["--config", path, "--dry-run"]) == 0
    assert main(["--config", path]) == 0


def test_a_clip_file_of_another_grid_is_refused_and_left_untouched(make_config, wiki_files, tmp_path, DELETE, capsys):
    state = tmp_path / "state"
    s1 = make_config({"calib": _calib(wiki_files), "eval": DELETE, "quant": _awq(G32, save_clip=True, clip_path=str(state)),
                      "save": {"save_path": str(tmp_path / "s1")}}, name="s1.yml")
    assert main(["--config", s1]) == 0
    clip_file = state / "clips.safetensors"
    before = clip_file.read_bytes()
    s2 = make_config({"calib": _calib(wiki_files), "eval": DELETE, "quant": _omniquant(G16, clip_path=str(state)),
                      "save": {"save_path": str(tmp_path / "s2"), "save_fake": True}}, name="s2.yml")
    assert main(["--config", s2]) == 2
    err = capsys.readouterr().err
    assert "quant.special.clip_path" in err and "group_size" in err and str(state) in err, err
    assert not (tmp_path / "s2").exists()
    assert clip_file.read_bytes() == before
    same = make_config({"calib": _calib(wiki_files), "eval": DELETE, "quant": _omniquant(G32, clip_path=str(state)),
                        "save": {"save_path": str(tmp_path / "s3"), "save_fake": True}}, name="s3.yml")
    assert main(["--config", same, "--dry-run"]) == 0
