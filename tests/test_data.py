"""Corpora: WikiText rows / stream / pages against the published files, the lm-eval detokenizer
against hand-written examples, counts and word rules, local files, hf: datasets (local folders the
tests write; hub names only offline), lazy reading with limit / max_bytes, peak memory on 300 MB,
and the errors a user meets."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmloss.data import (Document, iter_corpus, load_corpus, parse_hf_spec, wikitext_detokenize, wikitext_pages,
                         wikitext_rows)


@pytest.fixture(scope="module")
def corpora(assets):
    return assets / "corpora"


@pytest.fixture(scope="module")
def shared_rows(corpora):
    path = corpora / "wikitext-2-raw-v1" / "test.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def shared_pages(corpora):
    path = corpora / "wikitext-2-raw-v1" / "test.document_level.jsonl"
    return [json.loads(line)["page"] for line in path.read_text(encoding="utf-8").splitlines()]


# -- WikiText forms ---------------------------------------------------------------------------------

def test_rows_from_raw_file_equal_datasets_rows(corpora, shared_rows):
    raw = (corpora / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = wikitext_rows(raw)
    assert len(rows) == 4358 and rows == shared_rows


def test_rows_rule_by_hand():
    assert wikitext_rows(" \n = T = \n \n a b \n") == ["", " = T = \n", "", " a b \n"]
    assert wikitext_rows("x\r\ny\rz") == ["x\n", "y\n", "z"]
    assert wikitext_rows("") == []


def test_named_rows_and_stream(corpora, shared_rows):
    docs = load_corpus("wikitext", form="rows", data_dir=str(corpora))
    assert [d.text for d in docs] == shared_rows
    (stream,) = load_corpus("wikitext", form="stream", data_dir=str(corpora))
    assert stream.text == "\n\n".join(shared_rows)
    assert stream.n_bytes == 1296370  # the assets README's check of the HF guide's text


def test_derived_pages_equal_document_level_file(corpora, shared_pages):
    pages = load_corpus("wikitext", data_dir=str(corpora))  # default form: pages
    assert len(pages) == 62 == len(shared_pages)
    for i, (page, shared) in enumerate(zip(pages, shared_pages)):
        assert page.text == shared, f"page {i} ({page.name}) differs"
    assert pages[0].name == "Robert Boulter" and pages[-1].name == "The Hustler ( film )"


def test_pages_rule_by_hand():
    rows = ["", " = A = \n", "", " x \n", "", " = = Sub = = \n", " y \n", "", "", " = B = \n", " z \n", ""]
    pages = wikitext_pages(rows)
    assert [p.name for p in pages] == ["A", "B"]
    assert pages[0].text == " = A = \n \n x \n \n = = Sub = = \n y \n \n "
    assert pages[1].text == " = B = \n z \n \n"


def test_raw_file_alone_is_enough(tmp_path, corpora, shared_pages):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    shutil.copy(corpora / "wikitext-2-raw-v1" / "wiki.test.raw", tmp_path / "wikitext-2-raw-v1")
    pages = load_corpus("wikitext", data_dir=str(tmp_path))
    assert [p.text for p in pages] == shared_pages


def test_env_data_dir_and_lambada(monkeypatch, corpora):
    monkeypatch.setenv("LMLOSS_DATA_DIR", str(corpora))
    docs = load_corpus("lambada")
    assert len(docs) == 5153
    assert docs[0].text.startswith("In my palm is a clear stone")
    assert len(load_corpus("lambada_openai", limit=10)) == 10
    assert len(load_corpus("wikitext", limit=3)) == 3


# -- detokenizer and counts -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expect", [
    ("the cat 's toy", "the cat's toy"),
    ("the players ' union", "the players' union"),
    ("1 @,@ 000 @.@ 5 km @-@ long", "1,000.5 km-long"),
    ("a , b . c : d ; e ! f ? g", "a, b. c: d; e! f? g"),
    ("( a b ) [ c ] { d }", "(a b) [c] {d}"),
    ('he said " hi there " and " bye "', 'he said "hi there" and "bye"'),
    ("= = Section = = and = = = Sub = = = and = = = = Deep = = = =", "== Section == and === Sub === and ==== Deep ===="),
    ("10 \u00b0 C", "10\u00b0C"),
    (" = T = \n \n Body . \n", " = T =\n\nBody.\n"),
    ("scored N times", "scored 1 times"),
])
def test_detokenizer_rules_by_hand(raw, expect):
    assert wikitext_detokenize(raw) == expect


def test_detokenized_pages_count_the_original(corpora, shared_pages):
    pages = load_corpus("wikitext", data_dir=str(corpora), detokenize=True, limit=2)
    assert [p.original for p in pages] == shared_pages[:2]
    assert pages[0].text.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")
    assert "guest-starring" in pages[0].text
    assert pages[0].n_bytes == len(shared_pages[0].encode("utf-8")) != len(pages[0].text.encode("utf-8"))


def test_document_counts_by_hand():
    doc = Document(" naïve  café\n")
    assert (doc.n_bytes, doc.n_chars, doc.n_words) == (15, 13, 4)  # split: ['', 'naïve', 'café', '']
    assert Document("").n_words == 1  # lm-eval's rule counts an empty text as one word
    detok = Document("a-b", original="a @-@ b", name="t")
    assert (detok.n_bytes, detok.n_chars, detok.n_words) == (7, 7, 3)


# -- local files --------------------------------------------------------------------------------------

def test_local_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second é", encoding="utf-8")
    assert [d.text for d in load_corpus(str(tmp_path / "a.txt"))] == ["first doc\n"]
    assert [(d.name, d.text) for d in load_corpus(str(tmp_path))] == [("a", "first doc\n"), ("b", "second é")]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "x"}\n\n{"text": "y z"}\n', encoding="utf-8")
    assert [d.text for d in load_corpus(str(jl))] == ["x", "y z"]
    assert [d.text for d in load_corpus(str(jl), form="stream")] == ["x\n\ny z"]
    pl = tmp_path / "p.jsonl"
    pl.write_text('{"page": "p1", "id": 1}\n', encoding="utf-8")
    assert [d.text for d in load_corpus(str(pl))] == ["p1"]
    bl = tmp_path / "body.jsonl"
    bl.write_text('{"body": "b1"}\n', encoding="utf-8")
    assert [d.text for d in load_corpus(str(bl), field="body")] == ["b1"]
    with pytest.raises(ValueError, match="no 'text' or 'page' field"):
        load_corpus(str(bl))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["r1", "r2 ü"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert [d.text for d in load_corpus(str(tmp_path / "t.parquet"))] == ["r1", "r2 ü"]


def test_non_utf8_file_names_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc caf\xe9 ok".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8: byte offset 7 \(0xe9\)"):
        load_corpus(str(path))


def test_errors(tmp_path, corpora):
    with pytest.raises(ValueError, match="wikitext, lambada"):
        load_corpus("no-such-corpus")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="no text"):  # the first row of WikiText is ""
        load_corpus("wikitext", form="rows", limit=1, data_dir=str(corpora))
    with pytest.raises(ValueError, match="forms"):
        load_corpus("lambada", form="pages", data_dir=str(corpora))
    with pytest.raises(ValueError, match="limit"):
        load_corpus("wikitext", limit=0, data_dir=str(corpora))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_corpus(str(bad))


def test_nothing_found_says_how_to_go_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load_corpus("wikitext", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "wikitext-2-raw-v1/test.jsonl" in msg and "LMLOSS_DATA_DIR" in msg and "load_dataset" in msg


# -- what a user can get wrong in a file or a name ------------------------------------------------

def test_parquet_non_string_values_are_refused_with_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["r1", None, "r3"], "n": [1, 2, 3]}), path)
    with pytest.raises(ValueError, match=r"t\.parquet row 2: the text field 'text' holds NoneType, not a "
                                         r"string; .*--text-field NAME \(field= in load_corpus\)"):
        load_corpus(str(path))  # used to give the text "None"
    with pytest.raises(ValueError, match=r"t\.parquet row 1: the text field 'n' holds int, not a string"):
        load_corpus(str(path), field="n")  # used to give the text "1"
    with pytest.raises(ValueError, match=r"t\.parquet has no field 'body' \(fields: \['n', 'text'\]\); "
                                         r"pass --text-field NAME \(field= in load_corpus\)"):
        load_corpus(str(path), field="body")


def test_jsonl_errors_name_the_cli_option(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"body": "b1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 has no 'text' or 'page' field \(fields: \['body'\]\); "
                                         r"pass --text-field NAME \(field= in load_corpus\)"):
        load_corpus(str(path))
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.jsonl line 1: the text field 'text' holds int, not a string; "
                                         r".*--text-field NAME"):
        load_corpus(str(path))


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_corpus_name_is_refused(name):
    # Path("") is the current folder: "" used to read every .txt file there, or say "no .txt files"
    with pytest.raises(ValueError, match=r"the corpus name is empty.*wikitext, lambada"):
        load_corpus(name)


def test_files_without_text_or_not_utf8_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt.*has no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank\.jsonl.*has no text: 2 documents, all empty"):
        load_corpus(str(tmp_path / "blank.jsonl"))
    (tmp_path / "nothing.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"nothing\.jsonl.*has no text: 0 documents"):
        load_corpus(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl is not UTF-8: byte offset 13"):
        load_corpus(str(tmp_path / "latin1.jsonl"))


@given(st.text(alphabet="ab é\n\t\r\u3000\x1c\u2028", max_size=40))
def test_word_count_is_lm_evals_split_without_the_list(text):
    assert Document(text).n_words == len(re.split(r"\s+", text))


@given(st.text(alphabet="ab é\n\t\r\u3000\x1c\u2028\x85\xa0\u200b\ufeff", max_size=40),
       st.sampled_from([1, 2, 3, 5, 1 << 20]))
def test_word_counts_block_by_block_are_the_regex_counts(text, block):
    """Both word rules, counted with str.split in blocks of `block` characters (words and whitespace runs
    cut by a block's end put back together), against the regex counts they stand for."""
    import lmloss.data as data

    saved, data._WORD_BLOCK = data._WORD_BLOCK, block
    try:
        assert data._lm_eval_words(text) == len(re.split(r"\s+", text))
        lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
        assert data._ptb_words(text) == len(re.findall(r"\S+", text)) + lines
    finally:
        data._WORD_BLOCK = saved


# -- Document word rules ------------------------------------------------------------------------------

PTB_SAMPLE = (" no it was n't black monday \n"
              " but while the new york stock exchange did n't fall apart friday <unk> \n"
              " the dow jones industrials closed at N \n")


def test_document_api_keeps_its_fields_and_adds_a_word_rule():
    doc = Document("a b", "a  b", "t")  # positional (text, original, name) as before
    assert (doc.original, doc.name, doc.words, doc.n_words) == ("a  b", "t", "lm-eval", 2)
    with pytest.raises(ValueError, match=r"words='words' is not a word rule; expected one of \('lm-eval', 'ptb'\)"):
        Document("a", words="words")


def test_ptb_word_rule_by_hand():
    # 6 + 13 + 7 whitespace words, one <eos> per line: the count word-level PTB perplexities divide by
    doc = Document(PTB_SAMPLE, words="ptb")
    assert doc.n_words == (6 + 1) + (13 + 1) + (7 + 1) == 29
    assert Document(PTB_SAMPLE).n_words == 26 + 2  # lm-eval's re.split: the words and the two empty edges
    assert Document("a b", words="ptb").n_words == 3  # a last line without "\n" still ends a sentence
    assert Document("\n", words="ptb").n_words == 1  # an empty line is an empty sentence: its <eos>
    assert Document("", words="ptb").n_words == 0
    assert Document(" x \n y", words="ptb").n_words == 4 != Document(" x \n y").n_words


@given(st.text(alphabet="ab é\n\t\r\u3000\x1c\u2028", max_size=40))
def test_ptb_word_rule_is_pytorchs_line_split(text):
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    assert Document(text, words="ptb").n_words == sum(len(line.split()) + 1 for line in lines)


# -- hf:PATH[:CONFIG[:SPLIT[:FIELD]]] -----------------------------------------------------------------

TEXTS = ["first row", "naïve café 日本語", "", "  spaced \n lines \n", "🤗 last"]


def _parquet_folder(folder, columns: dict, split="test", row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / f"{split}-00000-of-00001.parquet", row_group_size=row_group_size)
    return folder


def _jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("spec, expect", [
    ("hf:allenai/c4:en:validation:text", ("allenai/c4", "en", "validation", "text")),
    ("hf:allenai/paloma:c4_100_domains:val", ("allenai/paloma", "c4_100_domains", "val", None)),
    ("hf:/data/my_dataset::test:content", ("/data/my_dataset", None, "test", "content")),
    ("hf:roneneldan/TinyStories", ("roneneldan/TinyStories", None, None, None)),
    ("hf:x:::", ("x", None, None, None)),
])
def test_hf_spec_grammar(spec, expect):
    assert parse_hf_spec(spec) == expect


@pytest.mark.parametrize("spec, why", [("hf:", "PATH is empty"), ("hf::x", "PATH is empty"),
                                       ("hf: :a", "PATH is empty"), ("hf:a:b:c:d:e", "it has 5 parts")])
def test_malformed_hf_spec_is_refused_with_the_grammar(spec, why):
    with pytest.raises(ValueError, match=re.escape(f"malformed dataset spec {spec!r} ({why}); expected "
                                                   "hf:PATH[:CONFIG[:SPLIT[:FIELD]]]")):
        load_corpus(spec)


def test_hf_local_parquet_folder_equals_the_same_texts_as_jsonl(tmp_path):
    folder = _parquet_folder(tmp_path / "ds", {"content": TEXTS, "id": list(range(len(TEXTS)))})
    expect = load_corpus(str(_jsonl(tmp_path / "same.jsonl", TEXTS)))
    assert [d.text for d in expect] == TEXTS
    # FIELD defaults to the only string column, SPLIT to "test"
    assert load_corpus(f"hf:{folder}") == expect
    assert load_corpus(f"hf:{folder}::test:content") == expect
    assert load_corpus(f"hf:{folder}", field="content") == expect
    assert list(iter_corpus(f"hf:{folder}")) == expect
    assert load_corpus(f"hf:{folder}", limit=2) == expect[:2]
    (stream,) = load_corpus(f"hf:{folder}", form="stream")
    assert stream.text == "\n\n".join(TEXTS)


def test_hf_default_split_is_test_then_validation(tmp_path):
    folder = _parquet_folder(tmp_path / "ds", {"text": ["v"]}, split="validation")
    _parquet_folder(folder, {"text": ["t"]}, split="train")
    assert [d.text for d in load_corpus(f"hf:{folder}")] == ["v"]
    _parquet_folder(folder, {"text": ["x"]}, split="test")
    assert [d.text for d in load_corpus(f"hf:{folder}")] == ["x"]
    assert [d.text for d in load_corpus(f"hf:{folder}::train")] == ["t"]


def test_hf_text_column_wins_over_other_strings_and_jsonl_folders_work(tmp_path):
    folder = tmp_path / "jl"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"title": "T", "text": "body"}\n', encoding="utf-8")
    assert [d.text for d in load_corpus(f"hf:{folder}")] == ["body"]
    assert [d.text for d in load_corpus(f"hf:{folder}:::title")] == ["T"]


def test_hf_errors_say_what_came_and_the_fix(tmp_path):
    two = _parquet_folder(tmp_path / "two", {"title": ["a"], "body": ["b"], "n": [1]})
    with pytest.raises(ValueError, match=r"several string columns \['title', 'body'\], so the text field is "
                                         r"ambiguous \(columns: \['title', 'body', 'n'\]\); name the field as FIELD"):
        load_corpus(f"hf:{two}")
    with pytest.raises(ValueError, match=r"has no split 'validation' \(splits: \['test'\]\)"):
        load_corpus(f"hf:{two}::validation")
    with pytest.raises(ValueError, match=r"row 1: the text field 'n' holds int, not a string"):
        load_corpus(f"hf:{two}:::n")
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: \['title', 'body', 'n'\]\)"):
        load_corpus(f"hf:{two}:::text")
    nulls = _parquet_folder(tmp_path / "nulls", {"text": ["a", None, "c"]})
    with pytest.raises(ValueError, match=r"row 2: the text field 'text' holds NoneType, not a string"):
        load_corpus(f"hf:{nulls}")
    numbers = _parquet_folder(tmp_path / "numbers", {"n": [1, 2]})
    with pytest.raises(ValueError, match=r"no 'text' column and no string column \(columns: \['n'\]\)"):
        load_corpus(f"hf:{numbers}")
    train = _parquet_folder(tmp_path / "train", {"text": ["a"]}, split="train")
    with pytest.raises(ValueError, match=r"has no test or validation split \(splits: \['train'\]\); name one: "
                                         rf"hf:{re.escape(str(train))}::train"):
        load_corpus(f"hf:{train}")
    with pytest.raises(ValueError, match=r"no folder .*gone; pass a folder of parquet"):
        load_corpus(f"hf:{tmp_path}/gone")
    with pytest.raises(ValueError, match=r"names the field 'title' but field='body' was passed"):
        load_corpus(f"hf:{two}:::title", field="body")
    blank = _parquet_folder(tmp_path / "blank", {"text": ["", "later"]})
    with pytest.raises(ValueError, match=r"has no text: 1 documents, all empty"):  # empty after limit
        load_corpus(f"hf:{blank}", limit=1)


def test_hf_hub_name_offline_says_what_was_tried():
    # offline mode (tests/conftest.py): not tried at all (lmloss.hub), rather than datasets' retries
    with pytest.raises(ValueError, match=r"datasets.load_dataset\('allenai/c4', 'en', streaming=True\) not tried: "
                                         r"its rows stream from the hub, and offline mode is set"):
        load_corpus("hf:allenai/c4:en:validation:text", limit=1)


# -- lazy reading, limit and max_bytes ------------------------------------------------------------------

SIZED = ["aé", "abcd", "ééa", "€€"]  # 3, 4, 5, 6 UTF-8 bytes


def _expected_by_bytes(sizes, max_bytes):
    """The rule written out: d_1..d_k, k the first index whose running total reaches max_bytes."""
    total = 0
    for k, size in enumerate(sizes, 1):
        total += size
        if total >= max_bytes:
            return k
    return len(sizes)


@pytest.mark.parametrize("max_bytes", [1, 3, 4, 7, 8, 12, 13, 18, 19, 1000])
def test_max_bytes_stops_after_the_document_that_reaches_the_bound(tmp_path, max_bytes):
    path = _jsonl(tmp_path / "sized.jsonl", SIZED)
    sizes = [len(t.encode("utf-8")) for t in SIZED]
    assert sizes == [3, 4, 5, 6]
    docs = load_corpus(str(path), max_bytes=max_bytes)
    assert [d.text for d in docs] == SIZED[:_expected_by_bytes(sizes, max_bytes)]
    total = sum(d.n_bytes for d in docs)
    assert total >= max_bytes or len(docs) == len(SIZED)
    assert total - docs[-1].n_bytes < max_bytes  # without its last document the result is under the bound


def test_limit_and_max_bytes_together_stop_at_the_first(tmp_path):
    path = _jsonl(tmp_path / "sized.jsonl", SIZED)
    assert len(load_corpus(str(path), limit=2, max_bytes=1000)) == 2
    assert len(load_corpus(str(path), limit=3, max_bytes=4)) == 2
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match=rf"max_bytes must be a positive int or None, got {re.escape(repr(bad))}"):
            load_corpus(str(path), max_bytes=bad)


def test_reading_stops_before_what_is_not_needed(tmp_path, monkeypatch):
    path = tmp_path / "bad_tail.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\nnot json\n', encoding="utf-8")
    assert [d.text for d in load_corpus(str(path), limit=2)] == ["one", "two"]
    assert [d.text for d in load_corpus(str(path), max_bytes=4)] == ["one", "two"]
    docs = iter_corpus(str(path))
    assert [next(docs).text, next(docs).text] == ["one", "two"]
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        next(docs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(10)]}), table, row_group_size=3)
    groups_read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: groups_read.append(i) or real(self, i, **kw))
    assert [d.text for d in load_corpus(str(table), limit=4)] == ["r0", "r1", "r2", "r3"]
    assert groups_read == [0, 1]  # by row groups: the rest of the file is never read
    groups_read.clear()
    assert len(load_corpus(str(table))) == 10 and groups_read == [0, 1, 2, 3]


def test_compressed_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped é"}\n{"text": "two"}\n')
    assert [d.text for d in load_corpus(str(tmp_path / "c.jsonl.gz"))] == ["zipped é", "two"]
    try:
        import zstandard
    except ImportError:  # an optional package: without it, the error says how to get it
        (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError, match="needs zstandard: pip install zstandard"):
            load_corpus(str(tmp_path / "c.jsonl.zst"))
    else:
        with zstandard.open(tmp_path / "c.jsonl.zst", "wb") as f:
            f.write('{"text": "zst é"}\n{"text": "two"}\n'.encode())
        assert [d.text for d in load_corpus(str(tmp_path / "c.jsonl.zst"), limit=1)] == ["zst é"]


def test_subset_and_field_go_only_where_they_mean_something(tmp_path, corpora):
    path = _jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ValueError, match=r"subset='ArXiv' picks a part of a named corpus \(pile, paloma\)"):
        load_corpus(str(path), subset="ArXiv")
    with pytest.raises(ValueError, match=r"corpus 'wikitext' has its own text field"):
        load_corpus("wikitext", field="page", data_dir=str(corpora))


_RSS_CHILD = r"""
import json, sys, time
import lmloss.data  # torch and the rest are imported before the peak is reset
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
start = time.perf_counter()
docs = lmloss.data.load_corpus(sys.argv[1], limit=3)
elapsed_s = time.perf_counter() - start
with open("/proc/self/status") as f:
    hwm_kib = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
print(json.dumps(dict(n=len(docs), hwm_kib=hwm_kib, elapsed_s=elapsed_s)))
"""


def _peak(path) -> dict:
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_limit_on_a_300_mb_jsonl_reads_only_its_start(tmp_path):
    """Peak RSS (VmHWM of the child, reset after its imports; ru_maxrss would include the parent's
    pre-exec peak) of load_corpus(limit=3) on 300 MB within 100 MB of the same on 1 MB, in seconds."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs")
    line = (json.dumps({"text": "lorem ipsum dolor sit amet é " * 34}) + "\n").encode("utf-8")  # ~1 KB
    block = line * 1000
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_bytes(block)
    with open(big, "wb") as f:
        for _ in range(300 * 1024 * 1024 // len(block) + 1):
            f.write(block)
    assert big.stat().st_size >= 300 * 1024 * 1024
    small_run, big_run = _peak(small), _peak(big)
    print(f"\npeak RSS: 1 MB {small_run}; 300 MB {big_run}")
    assert small_run["n"] == big_run["n"] == 3
    assert big_run["hwm_kib"] - small_run["hwm_kib"] < 100 * 1024
    assert big_run["elapsed_s"] < 5
