"""scripts/compare_tokenizers.py: its rows against counts made here, the table, JSON and PNG outputs."""
import importlib.util
import math
import json
from pathlib import Path

import pytest

from lmloss.tokenizers import load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_tokenizers.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_tokenizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_match_counts_made_here(compare, assets, tmp_path, capsys):
    texts = ["Bits per byte compare models; tokens do not.", "naïve café 日本語 🤗 <|endoftext|>"]
    corpus = tmp_path / "two.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out_json, out_png = tmp_path / "rows.json", tmp_path / "bars.png"
    rows = compare.main(["--tokenizers", "gpt2,o200k_base", "--dataset", str(corpus),
                         "--json", str(out_json), "--plot", str(out_png)])
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
    rows = compare.main(["--tokenizers", "gpt2", "--dataset", "wikitext:stream", "--data-dir", data_dir])
    assert rows[0]["corpus"] == "wikitext:stream" and rows[0]["n_documents"] == 1
    assert rows[0]["n_tokens"] == 287644 and rows[0]["n_bytes"] == 1296370


def test_unknown_tokenizer_fails_clearly(compare, assets, tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        compare.main(["--tokenizers", "no-such-tokenizer-xyz", "--dataset", str(tmp_path / "a.txt")])


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
    rows = compare.main(["--tokenizers", "gpt2", "--model", "gpt2", "--dataset", str(tmp_path / "a.txt")])
    assert seen == dict(model="model:gpt2", tokenizer="gpt2", n_docs=1)
    plain, scored = rows
    assert "bits_per_byte" not in plain and scored["model"] == "gpt2"
    assert scored["token_perplexity"] == pytest.approx(math.exp(2.0), rel=1e-12)
    assert scored["bits_per_byte"] == pytest.approx(2.0 * scored["n_tokens"] / (math.log(2) * 24), rel=1e-12)

    def not_there(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(compare.lmloss, "evaluate", not_there)
    with pytest.raises(SystemExit, match="needs lmloss.evaluate"):
        compare.main(["--tokenizers", "gpt2", "--model", "gpt2", "--dataset", str(tmp_path / "a.txt")])
