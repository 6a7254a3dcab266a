"""lmloss compare-tokenizers (scripts/compare_tokenizers.py): its rows against counts made here, the table, JSON and PNG outputs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmloss.tokenizers import Tokenizer, load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_tokenizers.py"


@pytest.fixture(scope="module")
def compare():
    from lmloss import cli_compare

    return cli_compare


def test_rows_match_counts_made_here(compare, assets, tmp_path, capsys):
    texts = ["Bits per byte compare models; tokens do not.", "naïve café 日本語 🤗 <|endoftext|>"]
    corpus = tmp_path / "two.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out_json, out_png = tmp_path / "rows.json", tmp_path / "bars.png"
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2,o200k_base", "--dataset", str(corpus),
                                           "--json", str(out_json), "--plot", str(out_png)]))
    assert json.loads(out_json.read_text()) == rows and len(rows) == 2
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    n_words = 8 + 5  # re.split(r"\s+", ...) pieces of each text
    for row, name in zip(rows, ["gpt2", "o200k_base"]):
        tok = load_tokenizer(name)
        ids = [i for t in texts for i in tok.encode(t)]
        assert {k: row[k] for k in ("tokenizer", "corpus", "n_tokens", "n_bytes", "n_chars", "n_words")} == \
            dict(tokenizer=name, corpus=str(corpus), n_tokens=len(ids), n_bytes=n_bytes, n_chars=n_chars,
                 n_words=n_words)
        assert row["bytes_per_token"] == pytest.approx(n_bytes / len(ids), rel=1e-12)
        assert row["tokens_per_word"] == pytest.approx(len(ids) / n_words, rel=1e-12)
        assert row["vocab_used"] == pytest.approx(len(set(ids)) / tok.vocab_size, rel=1e-12)
        assert row["bytes_exact"] is True
    out = capsys.readouterr().out
    assert out.startswith("| tokenizer | corpus |") and "| gpt2 |" in out and "rows in" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_named_corpus_with_form(compare, assets, capsys):
    data_dir = str(assets / "corpora")
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", "wikitext:stream",
                                           "--data-dir", data_dir]))
    assert rows[0]["corpus"] == "wikitext:stream" and rows[0]["n_documents"] == 1
    assert rows[0]["n_tokens"] == 287644 and rows[0]["n_bytes"] == 1296370


def test_unknown_tokenizer_fails_clearly(compare, assets, tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        compare.run(compare.parse_args(["--tokenizers", "no-such-tokenizer-xyz", "--dataset", str(tmp_path / "a.txt")]))


def test_model_rows_put_token_perplexity_next_to_bits_per_byte(compare, assets, tmp_path, monkeypatch):
    """The --model wiring, with the model and the evaluation loop replaced by stand-ins."""
    from types import SimpleNamespace

    from lmloss.metrics import LossTotals

    (tmp_path / "a.txt").write_text("hello world, hello bytes", encoding="utf-8")
    seen = {}

    def fake_evaluate(model, tokenizer, documents, **kwargs):
        seen.update(model=model, tokenizer=tokenizer.name, n_docs=len(documents))
        n_tokens = sum(len(tokenizer.encode(d.text)) for d in documents)
        return SimpleNamespace(totals=LossTotals(2.0 * n_tokens, n_tokens, sum(d.n_bytes for d in documents)))

    monkeypatch.setattr(compare.lmloss, "load_model", lambda spec, **kw: f"model:{spec}")
    monkeypatch.setattr(compare.lmloss, "evaluate", fake_evaluate)
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--model", "gpt2", "--dataset",
                                           str(tmp_path / "a.txt")]))
    assert seen == dict(model="model:gpt2", tokenizer="gpt2", n_docs=1)
    plain, scored = rows
    assert "bits_per_byte" not in plain and scored["model"] == "gpt2"
    assert scored["token_perplexity"] == pytest.approx(math.exp(2.0), rel=1e-12)
    assert scored["bits_per_byte"] == pytest.approx(2.0 * scored["n_tokens"] / (math.log(2) * 24), rel=1e-12)


# -- errors: one line on stderr, exit code 2, no traceback; --debug shows it --------------------------

def _txt(tmp_path, text="hello world, hello bytes") -> str:
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _no_work(compare, monkeypatch):
    """Loading corpora, tokenizers or models fails the test: for errors that must come before any work."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(compare, "load_dataset_spec", work)
    monkeypatch.setattr(compare, "load_tokenizer", work)
    monkeypatch.setattr(compare.lmloss, "load_model", work)


def _bad_input(kind, tmp_path, tiny_model):
    """(argv, a regex the message must match) for one kind of bad input."""
    text = _txt(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    cases = {
        "unknown tokenizer": (["--tokenizers", "no-such-tokenizer-xyz", "--dataset", text], "unknown tokenizer"),
        "unknown corpus": (["--tokenizers", "gpt2", "--dataset", "no-such-corpus"], "unknown corpus"),
        "missing file": (["--tokenizers", "gpt2", "--dataset", str(tmp_path / "gone.jsonl")], "no such file"),
        "not UTF-8": (["--tokenizers", "gpt2", "--dataset", str(latin1)], "is not UTF-8"),
        # lmloss.load_tokenizer may reject the folder itself, else measure() rejects its empty encoding
        "model folder without tokenizer": (["--tokenizers", tiny_model, "--dataset", text],
                                           "holds no usable tokenizer|encodes the 24 bytes of corpus .* to no tokens"),
        "model without tokenizer, before loading it": (["--tokenizers", "gpt2", "--model", tiny_model, "--dataset",
                                                        text], "holds no usable tokenizer|to no tokens"),
        "bad device": (["--tokenizers", "gpt2", "--model", "gpt2", "--device", "gpu0", "--dataset", text],
                       r"unknown device 'gpu0'"),
    }
    return cases[kind]


@pytest.mark.parametrize("kind", ["unknown tokenizer", "unknown corpus", "missing file", "not UTF-8",
                                  "model folder without tokenizer", "model without tokenizer, before loading it",
                                  "bad device"])
def test_user_errors_exit_2_with_a_message_not_a_traceback(compare, assets, tmp_path, tiny_model, capsys,
                                                           monkeypatch, kind):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(compare.lmloss, "load_model", no_model)
    argv, words = _bad_input(kind, tmp_path, tiny_model)
    assert compare.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and re.search(words, captured.err)
    assert "Traceback" not in captured.err and captured.out == ""


def test_debug_shows_the_traceback(compare, assets, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        compare.main(["--tokenizers", "no-such-tokenizer-xyz", "--dataset", _txt(tmp_path), "--debug"])


def test_script_exits_2_without_a_traceback(assets, tmp_path):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(assets / "tokenizers" / "tiktoken_cache"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--tokenizers", "gpt2", "--dataset",
                           str(tmp_path / "gone.txt")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: unknown corpus") and "Traceback" not in done.stderr


# -- measure(): no division by zero -------------------------------------------------------------------

class _Stub(Tokenizer):
    """A tokenizer that encodes every text to `ids`."""

    def __init__(self, ids):
        self.name, self.vocab_size, self._ids = "stub", 4, list(ids)

    def encode(self, text):
        return list(self._ids)

    def byte_lengths(self):
        return [1, 1, 1, 1]


def test_measure_rejects_a_tokenizer_that_encodes_text_to_no_tokens(compare):
    from lmloss.data import Document

    docs = [Document("héllo"), Document("")]
    with pytest.raises(ValueError, match=r"tokenizer 'stub' encodes the 6 bytes of corpus 'c' to no tokens: "
                                         r"it is not a usable tokenizer for this text"):
        compare.measure(_Stub([]), "c", docs)
    # whitespace still counts words (re.split gives >= 1 piece per document): n_words is never 0
    row = compare.measure(_Stub([0]), "c", [Document(" ")])
    assert (row["n_words"], row["n_tokens"], row["tokens_per_word"]) == (2, 1, 0.5)


# -- lists and numbers checked when the command line is parsed ---------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--dataset", ""], "--dataset names no corpus"),
    (["--dataset", " , ,"], "--dataset names no corpus"),
    (["--tokenizers", ""], "--tokenizers names no tokenizer"),
    (["--tokenizers", ","], "--tokenizers names no tokenizer"),
    (["--model", ","], "--model names no model"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-3"], "--limit must be >= 1"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--max-bytes", "0"], "--max-bytes must be >= 1"),
])
def test_empty_lists_and_bad_numbers_are_usage_errors(compare, tmp_path, capsys, monkeypatch, argv, words):
    _no_work(compare, monkeypatch)
    base = {"--tokenizers": "gpt2", "--dataset": _txt(tmp_path)}
    base.update(zip(argv[::2], argv[1::2]))
    with pytest.raises(SystemExit) as exit_info:
        compare.main([x for kv in base.items() for x in kv])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_tokenizers_may_be_empty_when_models_are_given(compare, tmp_path):
    args = compare.parse_args(["--tokenizers", "", "--model", "gpt2", "--dataset", _txt(tmp_path)])
    assert compare.split_list(args.tokenizers) == [] and compare.split_list(args.model) == ["gpt2"]


# -- --json and --plot checked before any work; --json written atomically -----------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--plot", "{tmp}", "is a folder"),
    ("--json", "{tmp}", "is a folder"),
    ("--plot", "{tmp}/bars", "does not end in .png"),
    ("--plot", "{tmp}/bars.svg", "does not end in .png"),
    ("--json", "{tmp}/no-such-folder/rows.json", "is not an existing folder"),
    ("--plot", "{tmp}/no-such-folder/bars.png", "is not an existing folder"),
    ("--json", "{tmp}/file.txt/rows.json", "is not an existing folder"),
    ("--json", "/dev/null", "is not a regular file"),
    ("--json", "{tmp}/fifo", "is not a regular file"),  # as /dev/stdout is when piped
])
def test_output_paths_are_checked_before_any_work(compare, tmp_path, capsys, monkeypatch, option, value, words):
    (tmp_path / "file.txt").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    _no_work(compare, monkeypatch)
    value = value.format(tmp=tmp_path)
    assert compare.main(["--tokenizers", "gpt2", "--dataset", "wikitext", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {value!r}") and words in err and "Traceback" not in err


def test_unwritable_output_folder_is_checked_before_any_work(compare, tmp_path, capsys, monkeypatch):
    _no_work(compare, monkeypatch)
    real_access = os.access
    monkeypatch.setattr(os, "access",  # chmod cannot stop root, so the check is told the answer
                        lambda p, mode, **kw: False if Path(p).resolve() == tmp_path.resolve()
                        else real_access(p, mode, **kw))
    assert compare.main(["--tokenizers", "gpt2", "--dataset", "wikitext", "--json", str(tmp_path / "r.json")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_any_work(compare, tmp_path, capsys, monkeypatch):
    _no_work(compare, monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert compare.main(["--tokenizers", "gpt2", "--dataset", "wikitext", "--plot", str(tmp_path / "b.png")]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


@pytest.fixture
def umask_002():
    before = os.umask(0o002)
    yield
    os.umask(before)


def test_json_is_replaced_atomically_with_the_umask_mode(compare, assets, tmp_path, capsys, monkeypatch, umask_002):
    out = tmp_path / "rows.json"
    argv = ["--tokenizers", "gpt2", "--dataset", _txt(tmp_path), "--json", str(out)]
    renames, real_replace = [], os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    assert compare.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["tokenizer"] for r in rows] == ["gpt2"] and rows[0]["n_bytes"] == 24
    assert len(renames) == 1 and renames[0][1] == out.resolve() and renames[0][0].parent == tmp_path.resolve()
    assert out.stat().st_mode & 0o777 == 0o664  # 0o666 & ~umask, not mkstemp's 0o600
    stdout = capsys.readouterr().out
    assert stdout.startswith("| tokenizer | corpus |") and "| gpt2 |" in stdout

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    out.write_text("old rows\n")
    monkeypatch.setattr(os, "replace", disk_full)
    assert compare.main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == "old rows\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "rows.json"]


# -- --text-field and encode_document -----------------------------------------------------------------

def test_text_field_picks_the_field_of_jsonl_records(compare, assets, tmp_path, capsys):
    texts = ["first body", "second body, é"]
    corpus = tmp_path / "bodies.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", str(corpus), "--text-field", "body"]))
    assert rows[0]["n_documents"] == 2 and rows[0]["n_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert compare.main(["--tokenizers", "gpt2", "--dataset", str(corpus)]) == 2
    assert "no 'text' or 'page' field" in capsys.readouterr().err
    assert compare.main(["--tokenizers", "gpt2", "--dataset", _txt(tmp_path), "--text-field", "body"]) == 2
    assert "--text-field" in capsys.readouterr().err


def test_measure_counts_equal_plain_encode(compare):
    """measure() encodes in pieces (lmloss.encode_document); its counts equal tokenizer.encode's."""
    from lmloss.data import Document

    tok = load_tokenizer("gpt2")
    docs = [Document("Bits per byte compare models; tokens do not. " * 3000), Document("naïve café 日本語 🤗")]
    ids = [tok.encode(d.text) for d in docs]
    row = compare.measure(tok, "c", docs)
    assert row["n_tokens"] == sum(map(len, ids)) and row["bytes_exact"]
    assert row["vocab_used"] == len(set().union(*ids)) / tok.vocab_size


# -- hf: specs, --max-bytes, --subset ----------------------------------------------------------------

@pytest.mark.parametrize("spec, expect", [
    ("wikitext:stream", ("wikitext", "stream")),
    ("wikitext", ("wikitext", None)),
    ("data.jsonl:rows", ("data.jsonl", "rows")),
    ("hf:allenai/paloma:c4_100_domains:val", ("hf:allenai/paloma:c4_100_domains:val", None)),
    ("hf:some/dataset:rows", ("hf:some/dataset:rows", None)),  # a config named "rows" is not a form
    ("hf:/data/my_dataset::test:stream", ("hf:/data/my_dataset::test:stream", None)),
])
def test_split_spec_never_splits_an_hf_spec(compare, spec, expect):
    assert compare.split_spec(spec) == expect


def _parquet_folder(folder, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    pq.write_table(pa.table({"content": texts, "id": list(range(len(texts)))}), folder / "test-00000.parquet",
                   row_group_size=2)
    return folder


def test_hf_spec_with_max_bytes(compare, assets, tmp_path):
    texts = ["first é", "second", "third one", "fourth"]  # 8, 6, 9, 6 bytes
    folder = _parquet_folder(tmp_path / "ds", texts)
    spec = f"hf:{folder}::test:content"
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", spec, "--max-bytes", "15"]))
    # 8 + 6 = 14 < 15, so the third document, which reaches 23 >= 15, is the last
    assert rows[0]["corpus"] == spec and rows[0]["n_documents"] == 3 and rows[0]["n_bytes"] == 23
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", f"hf:{folder}", "--text-field",
                                           "content", "--max-bytes", "14"]))
    assert rows[0]["n_documents"] == 2 and rows[0]["n_bytes"] == 14


def test_hf_errors_exit_2(compare, tmp_path, capsys):
    assert compare.main(["--tokenizers", "gpt2", "--dataset", "hf::x"]) == 2
    assert "malformed dataset spec 'hf::x'" in capsys.readouterr().err
    folder = _parquet_folder(tmp_path / "ds", ["a"])
    assert compare.main(["--tokenizers", "gpt2", "--dataset", f"hf:{folder}::validation"]) == 2
    assert "has no split 'validation' (splits: ['test'])" in capsys.readouterr().err


def test_subset_of_a_named_corpus(compare, assets, tmp_path):
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "val.jsonl").write_text(
        "".join(json.dumps({"text": t, "meta": {"pile_set_name": s}}) + "\n"
                for t, s in (("a paper", "ArXiv"), ("code", "Github"), ("b paper", "ArXiv"))), encoding="utf-8")
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", "pile", "--subset", "ArXiv",
                                           "--data-dir", str(tmp_path)]))
    assert rows[0]["n_documents"] == 2 and rows[0]["n_bytes"] == 14


def test_text_field_and_subset_go_only_to_the_corpora_they_apply_to(compare, assets, tmp_path, capsys):
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "val.jsonl").write_text(json.dumps({"text": "a paper", "meta": {"pile_set_name": "ArXiv"}})
                                                 + "\n", encoding="utf-8")
    posts = tmp_path / "posts.jsonl"
    posts.write_text(json.dumps({"body": "a post"}) + "\n", encoding="utf-8")
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", f"lambada,{posts}", "--text-field",
                                           "body", "--data-dir", str(assets / "corpora"), "--limit", "2"]))
    assert [r["n_documents"] for r in rows] == [2, 1]
    rows = compare.run(compare.parse_args(["--tokenizers", "gpt2", "--dataset", f"pile,{posts}", "--text-field",
                                           "body", "--subset", "ArXiv", "--data-dir", str(tmp_path)]))
    assert [r["n_bytes"] for r in rows] == [7, 6]
    assert compare.main(["--tokenizers", "gpt2", "--dataset", str(posts), "--subset", "ArXiv"]) == 2
    assert "--subset 'ArXiv' picks a part of a named corpus (pile, paloma)" in capsys.readouterr().err
