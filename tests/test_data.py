"""Corpora: WikiText rows / stream / pages against the published files, the lm-eval detokenizer
against hand-written examples, counts, local files and the errors a user meets."""
import json
import re
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmloss.data import Document, load_corpus, wikitext_detokenize, wikitext_pages, wikitext_rows


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
