"""Data sources, preprocessors, calibration batching and evaluation text (no network)."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from loguru import logger

from llmc.data import batch_samples, default_preproc, load_calib_samples, load_eval_text
from llmc.data.preproc import encode
from llmc.errors import ConfigError, UserError
from llmc.registry import DATASETS, PREPROCESSORS
from tests.tiny import CORPUS, make_tokenizer

SENTENCES = sorted(set(CORPUS))
WIKI = " = Robert Boulter = \n \n Robert Boulter is an English film actor .\n\n = = Career = = \n \n"
WIKI_ROWS = [" = Robert Boulter = ", " ", " Robert Boulter is an English film actor .", "", " = = Career = = ", " "]


def long_rows(n: int = 40) -> list[str]:
    """Rows of a few sentences each, varied so windows at different starts differ."""
    return [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4)) + f" {i}" for i in range(n)]


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def warnings():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def cfg(**kw):
    base = dict(name="txt", download=False, path=None, n_samples=4, seq_len=8, preproc=None, seed=0)
    return SimpleNamespace(**{**base, **kw})


# ---- sources -------------------------------------------------------------------------------------


def test_wikitext_file_rows_are_lines_without_endings(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(WIKI, encoding="utf-8")
    (tmp_path / "crlf.raw").write_bytes(WIKI.replace("\n", "\r\n").encode())
    rows = DATASETS.get("wikitext2")(str(tmp_path / "wiki.test.raw"), False, "eval")
    assert rows == WIKI_ROWS
    assert DATASETS.get("wikitext2")(str(tmp_path / "crlf.raw"), False, "eval") == WIKI_ROWS
    assert load_eval_text("wikitext2", str(tmp_path / "wiki.test.raw"), False) == "\n\n".join(WIKI_ROWS)


def test_wikitext_saved_dataset_folder(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": WIKI_ROWS})}).save_to_disk(tmp_path / "ds")
    assert DATASETS.get("wikitext2")(str(tmp_path / "ds"), False, "eval") == WIKI_ROWS


def test_wikitext_download_uses_hf_splits(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{kwargs['split']} row\n", ""]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert DATASETS.get("wikitext2")(None, True, "calib") == ["train row\n", ""]
    assert load_eval_text("wikitext2", None, True) == "test row\n\n\n"
    assert [c[0] for c in calls] == [("wikitext", "wikitext-2-raw-v1")] * 2
    assert [c[1]["split"] for c in calls] == ["train", "test"]


def test_download_failure_is_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"calib.download: false"):
        DATASETS.get("c4")(None, True, "calib")


def test_c4_eval_joins_first_1100_docs(tmp_path):
    path = tmp_path / "c4-validation.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc{i}", "url": "u"}) for i in range(1200)) + "\n")
    text = load_eval_text("c4", str(path), False)
    assert text == " ".join(f"doc{i}" for i in range(1100))


def test_ptb_and_txt_rows(tmp_path):
    (tmp_path / "ptb.txt").write_text(" the cat sat \n a dog ran \n\n")
    assert DATASETS.get("ptb")(str(tmp_path / "ptb.txt"), False, "calib") == ["the cat sat", "a dog ran"]
    assert load_eval_text("ptb", str(tmp_path / "ptb.txt"), False) == "the cat sat a dog ran"
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first line\n\n   \nsecond line\n")
    (folder / "b.txt").write_text("third\n")
    (folder / "skip.md").write_text("not text\n")
    assert DATASETS.get("txt")(str(folder), False, "calib") == ["first line", "second line", "third"]
    assert load_eval_text("txt", str(folder / "a.txt"), False) == "first line\n\n   \nsecond line\n"


def test_jsonl_text_and_src_tgt_records(tmp_path):
    path = tmp_path / "data.jsonl"
    recs = [{"text": "plain"}, {"src": "question?", "tgt": "answer."}, {"src": "only src"}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert DATASETS.get("jsonl")(str(path), False, "calib") == ["plain", "question?\nanswer.", "only src"]
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(recs))
    assert DATASETS.get("json")(str(as_list), False, "calib") == ["plain", "question?\nanswer.", "only src"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ConfigError, match=r"eval.path.*bad.jsonl:2.*'text' or 'src'") as err:
        DATASETS.get("jsonl")(str(bad), False, "eval")
    assert err.value.key == "eval.path"


def test_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"calib.path: is not set") as err:
        DATASETS.get("wikitext2")(None, False, "calib")
    assert err.value.key == "calib.path"
    missing = str(tmp_path / "nope.raw")
    with pytest.raises(ConfigError, match=r"eval.path: '.*nope.raw' does not exist"):
        load_eval_text("wikitext2", missing, False)
    with pytest.raises(ConfigError, match=r"calib.path: .*nope.raw"):
        load_calib_samples(cfg(name="pileval", path=missing), make_tokenizer())
    with pytest.raises(ConfigError, match="not a saved dataset"):
        DATASETS.get("c4")(str(tmp_path), False, "calib")


def test_unknown_names_suggest(tok):
    with pytest.raises(ConfigError, match=r"calib.name: unknown dataset 'wikitxt2'.*Did you mean 'wikitext2'"):
        load_calib_samples(cfg(name="wikitxt2"), tok)
    with pytest.raises(ConfigError, match=r"calib.preproc: unknown preprocessor 'wikitext2_gtpq'.*wikitext2_gptq"):
        load_calib_samples(cfg(name="wikitext2", preproc="wikitext2_gtpq"), tok)
    with pytest.raises(ConfigError, match=r"eval.name"):
        load_eval_text("wiki", None, True)


# ---- preprocessors -------------------------------------------------------------------------------

WINDOWED = ["wikitext2_gptq", "ptb_gptq", "pileval_omni", "random_truncate_txt", "c4_gptq"]


def run(name, rows, n, seq_len, seed):
    return PREPROCESSORS.get(name)(rows, make_tokenizer(), n, seq_len, random.Random(seed))


def is_window(sample: torch.Tensor, stream: torch.Tensor) -> bool:
    L = sample.shape[1]
    return any(torch.equal(stream[0, i:i + L], sample[0]) for i in range(stream.shape[1] - L + 1))


@pytest.mark.parametrize("name", WINDOWED)
def test_windowed_preprocs_shape_and_seed(name):
    rows = long_rows()
    a, b, c = run(name, rows, 6, 16, 1), run(name, rows, 6, 16, 1), run(name, rows, 6, 16, 2)
    assert len(a) == 6 and all(s.shape == (1, 16) and s.dtype == torch.long for s in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_gptq_windows_come_from_joined_text(tok):
    rows = long_rows(10)
    assert all(is_window(s, encode(tok, "\n\n".join(rows))) for s in run("wikitext2_gptq", rows, 5, 12, 0))
    assert all(is_window(s, encode(tok, " ".join(rows))) for s in run("ptb_gptq", rows, 5, 12, 0))


def test_c4_gptq_picks_long_enough_docs(tok):
    rows = ["tiny", "short one", " ".join(SENTENCES)]  # only the last row reaches 20 tokens
    samples = run("c4_gptq", rows, 4, 20, 0)
    assert len(samples) == 4 and all(is_window(s, encode(tok, rows[2])) for s in samples)
    with pytest.raises(UserError, match="no row .* seq_len=20"):
        run("c4_gptq", rows[:2], 4, 20, 0)


def test_windows_need_enough_tokens():
    with pytest.raises(UserError, match="fewer than seq_len=500"):
        run("wikitext2_gptq", ["a short text"], 2, 500, 0)


def test_pileval_awq_concatenates_and_splits(tok):
    line = SENTENCES[0]
    per_line = encode(tok, line).shape[1]
    seq_len = 3 * per_line + 2  # samples straddle line boundaries
    rows = [line] * 12 + ["   "] * 20 + [" ".join(SENTENCES * 4)] * 20  # blank and over-long rows are skipped
    samples = run("pileval_awq", rows, 10, seq_len, 0)
    assert len(samples) == (10 * per_line) // seq_len
    assert all(s.shape == (1, seq_len) for s in samples)
    stream = encode(tok, line).repeat(1, 10)
    assert torch.equal(torch.cat(samples, dim=1), stream[:, : len(samples) * seq_len])


def test_pileval_smooth_truncates_first_n(tok):
    rows = long_rows(12)
    samples = run("pileval_smooth", rows, 5, 10, 3)
    assert len(samples) == 5 and all(1 <= s.shape[1] <= 10 for s in samples)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    assert [s.tolist() for s in samples] == [encode(tok, r)[:, :10].tolist() for r in shuffled[:5]]


def test_txt_general_keeps_only_full_rows(tok, warnings):
    rows = ["tiny", "short one", SENTENCES[1], " ".join(SENTENCES), "x"]
    seq_len = encode(tok, SENTENCES[1]).shape[1]
    samples = run("txt_general_preproc", rows, 5, seq_len, 0)
    assert sorted(s.tolist() for s in samples) == sorted(
        [encode(tok, SENTENCES[1]).tolist(), encode(tok, rows[3])[:, :seq_len].tolist()]
    )
    assert any("only 2 of 5" in w for w in warnings)
    with pytest.raises(UserError, match="no samples"):
        run("txt_general_preproc", ["tiny"], 5, seq_len, 0)


# ---- calibration ---------------------------------------------------------------------------------


def test_default_preproc_table():
    table = {n: default_preproc(n) for n in ["wikitext2", "c4", "ptb", "pileval", "txt", "json", "jsonl"]}
    assert table == {"wikitext2": "wikitext2_gptq", "c4": "c4_gptq", "ptb": "ptb_gptq", "pileval": "pileval_awq",
                     "txt": "txt_general_preproc", "json": "txt_general_preproc", "jsonl": "txt_general_preproc"}


def test_load_calib_samples_reproducible_and_isolated(tmp_path, tok):
    (tmp_path / "calib.txt").write_text("\n".join(long_rows()) + "\n")
    c = cfg(path=str(tmp_path / "calib.txt"), n_samples=5, seq_len=12)
    random.seed(123)
    a = load_calib_samples(c, tok)
    state = random.getstate()
    random.seed(999)
    b = load_calib_samples(c, tok)
    assert len(a) == 5 and all(s.shape == (1, 12) for s in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    random.seed(123)
    load_calib_samples(c, tok)
    assert random.getstate() == state  # the global RNG is left alone
    other = load_calib_samples(cfg(**{**vars(c), "seed": 7, "preproc": "random_truncate_txt"}), tok)
    assert len(other) == 5 and all(s.shape == (1, 12) for s in other)
    with pytest.raises(ConfigError, match=r"calib.seq_len: got 0"):
        load_calib_samples(cfg(**{**vars(c), "seq_len": 0}), tok)


def test_batch_samples():
    samples = [torch.full((1, 4), i, dtype=torch.long) for i in range(7)]
    (one,) = batch_samples(samples, -1)
    assert one.shape == (7, 4) and one[:, 0].tolist() == list(range(7))
    assert [b.shape for b in batch_samples(samples, 1)] == [(1, 4)] * 7
    threes = batch_samples(samples, 3)
    assert [b.shape[0] for b in threes] == [3, 3, 1] and threes[1][:, 0].tolist() == [3, 4, 5]
    ragged = samples[:2] + [torch.zeros(1, 3, dtype=torch.long)]
    assert len(batch_samples(ragged, 1)) == 3
    assert len(batch_samples(ragged, 2)) == 2  # [4, 4] then [3]: each batch is even
    with pytest.raises(ConfigError, match=r"calib.bs: .*\[3, 4\].*bs: 1") as err:
        batch_samples(ragged, -1)
    assert err.value.key == "calib.bs"
    with pytest.raises(ConfigError, match="calib.bs: got 0"):
        batch_samples(samples, 0)
