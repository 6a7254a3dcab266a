"""The named-corpus table: every entry consistent, every name loaded from a small mirror the test
writes in its layout, every name's offline error, the enwik8/text8 tail split and PTB's words."""
import dataclasses
import gzip
import json
import re
import shutil
import zipfile

import pytest

from lmloss import corpora
from lmloss.corpora import ALIASES, CORPORA, tail_split
from lmloss.data import FORMS, WORD_RULES, load_corpus


def _jsonl_lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# -- the table ------------------------------------------------------------------------------------------

def test_every_entry_says_where_it_comes_from_and_how_it_counts():
    assert list(CORPORA)[:2] == ["wikitext", "lambada"]
    assert {"wikitext", "wikitext-103", "lambada", "ptb", "enwik8", "text8", "pg19", "c4", "pile", "paloma",
            "tinystories"} <= set(CORPORA)
    for name, c in CORPORA.items():
        assert (c.hub is None) != (c.url is None), name  # exactly one remote source
        assert c.local and c.counts and c.convention, name
        assert c.default_form in c.forms and set(c.forms) <= set(FORMS), name
        assert c.layout in ("records", "lines", "tail") and c.words in WORD_RULES, name
        assert (c.layout == "tail") == (c.tail is not None) == (c.file_bytes is not None), name
        assert bool(c.subsets) == (c.subset_by is not None), name
        assert c.hub is None or len(c.hub) == 4, name
        assert c.layout != "records" or c.hub is not None, name  # records take the hub's text field
    assert set(ALIASES.values()) <= set(CORPORA)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_corpus("wikitext-4")
    assert "unknown corpus 'wikitext-4'" in str(err.value)
    assert all(name in str(err.value) for name in CORPORA) and "hf:PATH" in str(err.value)


# -- each name from a local mirror ------------------------------------------------------------------

def test_wikitext_103_reads_its_own_files_only(tmp_path, assets):
    raw = assets / "corpora" / "wikitext-2-raw-v1" / "wiki.test.raw"
    with pytest.raises(ValueError, match=r"could not load corpus 'wikitext-103'.*wikitext-103-raw-v1/test\.jsonl"):
        load_corpus("wikitext-103", data_dir=str(assets / "corpora"))  # WikiText-2's files are not taken
    (tmp_path / "wikitext-103-raw-v1").mkdir()
    shutil.copy(raw, tmp_path / "wikitext-103-raw-v1")
    pages = load_corpus("wikitext-103", data_dir=str(tmp_path))
    assert pages == load_corpus("wikitext", data_dir=str(assets / "corpora"))  # the same test text
    assert len(pages) == 62 and len(load_corpus("wikitext-103", form="rows", data_dir=str(tmp_path))) == 4358


PTB_LINES = [" no it was n't black monday \n", " but while the new york stock exchange did n't fall apart friday "
             "<unk> \n", " the dow jones industrials closed at N \n"]


@pytest.mark.parametrize("where", ["ptb/ptb.test.txt", "ptb.test.txt"])
def test_ptb_stream_and_rows_count_one_eos_per_sentence(tmp_path, where):
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(PTB_LINES), encoding="utf-8")
    (stream,) = load_corpus("ptb", data_dir=str(tmp_path))
    assert stream.text == "".join(PTB_LINES) and stream.words == "ptb"
    assert stream.n_words == (6 + 1) + (13 + 1) + (7 + 1)
    rows = load_corpus("ptb", form="rows", data_dir=str(tmp_path))
    assert [r.text for r in rows] == PTB_LINES and [r.n_words for r in rows] == [7, 14, 8]
    (detok,) = load_corpus("ptb", data_dir=str(tmp_path), detokenize=True)
    assert detok.words == "ptb" and detok.n_words == stream.n_words


@pytest.fixture
def small_tails(monkeypatch):
    """enwik8 and text8 with the real code path and a 100-unit file: 80 train, 10 valid, 10 test."""
    for name in ("enwik8", "text8"):
        monkeypatch.setitem(CORPORA, name, dataclasses.replace(CORPORA[name], tail=10, file_bytes=100))


@pytest.mark.parametrize("name", ["enwik8", "text8"])
@pytest.mark.parametrize("packed", [False, True])
def test_enwik8_text8_test_split_is_the_last_units(tmp_path, small_tails, name, packed):
    data = b"t" * 80 + b"v" * 10 + b"test split"  # the layout of the 100 MB file, scaled to 100 bytes
    if packed:
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(name, data)
    else:
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_bytes(data)
    (doc,) = load_corpus(name, data_dir=str(tmp_path))
    assert doc.text == "test split" and doc.n_bytes == 10 and doc.name == name


def test_tail_split_refuses_another_file_and_drops_a_cut_character(tmp_path, small_tails):
    (tmp_path / "enwik8").mkdir()
    (tmp_path / "enwik8" / "enwik8").write_bytes(b"x" * 99)
    with pytest.raises(ValueError, match=r"holds 99 bytes, expected 100: a truncated or different file"):
        load_corpus("enwik8", data_dir=str(tmp_path))
    path = tmp_path / "f"
    path.write_bytes(("a" * 8 + "é" + "bcdefghi€").encode())  # é = c3 a9 straddles a cut 12 bytes from the end
    assert len(path.read_bytes()) == 8 + 2 + 11
    assert tail_split(path, 12) == "bcdefghi€"  # c3 is outside, its a9 is dropped: 11 bytes
    assert tail_split(path, 13) == "ébcdefghi€"
    assert tail_split(path, 3, unit="chars") == "hi€"
    path.write_bytes(b"abc" + "€".encode()[:2])  # the file ends inside a character
    assert tail_split(path, 4) == "bc"
    with pytest.raises(ValueError, match="fewer than the 10 of the test split"):
        tail_split(path, 10)
    with pytest.raises(ValueError, match="holds no member 'text8'"):
        with zipfile.ZipFile(tmp_path / "text8.zip", "w") as zf:
            zf.writestr("other", "x")
        tail_split(tmp_path / "text8.zip", 1)


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_pg19_books(tmp_path, layout):
    books = {"10": "Book one.\n\nChapter I\n", "9": "Book two é\n"}
    (tmp_path / "pg19" / "test").mkdir(parents=True)
    if layout == "txt":  # DeepMind's files: test/<book id>.txt
        for book_id, text in books.items():
            (tmp_path / "pg19" / "test" / f"{book_id}.txt").write_text(text, encoding="utf-8")
        expect = [("10", books["10"]), ("9", books["9"])]  # sorted by file name
    else:
        (tmp_path / "pg19" / "test.jsonl").write_text(_jsonl_lines({"short_book_title": k, "text": v}
                                                                   for k, v in books.items()), encoding="utf-8")
        expect = [("", books["10"]), ("", books["9"])]
    docs = load_corpus("pg19", data_dir=str(tmp_path))
    assert [(d.name, d.text) for d in docs] == expect


def test_c4_reads_the_validation_shards_in_order(tmp_path):
    (tmp_path / "c4" / "en").mkdir(parents=True)
    for shard, texts in ((1, ["c", "d"]), (0, ["a", "b"])):
        with gzip.open(tmp_path / "c4" / "en" / f"c4-validation.0000{shard}-of-00008.json.gz", "wt") as f:
            f.write(_jsonl_lines({"text": t, "timestamp": "2019", "url": "u"} for t in texts))
    assert [d.text for d in load_corpus("c4", data_dir=str(tmp_path))] == ["a", "b", "c", "d"]
    assert [d.text for d in load_corpus("c4", data_dir=str(tmp_path), limit=3)] == ["a", "b", "c"]


def test_pile_subset_is_a_pile_set_name(tmp_path):
    (tmp_path / "pile").mkdir()
    records = [{"text": "paper", "meta": {"pile_set_name": "ArXiv"}},
               {"text": "code", "meta": {"pile_set_name": "Github"}},
               {"text": "paper 2", "meta": {"pile_set_name": "ArXiv"}}]
    (tmp_path / "pile" / "val.jsonl").write_text(_jsonl_lines(records), encoding="utf-8")
    assert [d.text for d in load_corpus("pile", data_dir=str(tmp_path))] == ["paper", "code", "paper 2"]
    assert [d.text for d in load_corpus("pile", subset="ArXiv", data_dir=str(tmp_path))] == ["paper", "paper 2"]
    with pytest.raises(ValueError, match=r"corpus 'pile' has no subset 'arxiv'; its subsets: Pile-CC, .*ArXiv"):
        load_corpus("pile", subset="arxiv", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"has no text: 0 documents"):  # a valid set absent from this file
        load_corpus("pile", subset="Books3", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"corpus 'wikitext' has no subsets.*pile, paloma"):
        load_corpus("wikitext", subset="ArXiv")


def test_paloma_subset_is_a_source_folder(tmp_path):
    for split, text in (("test", "scored"), ("val", "not scored")):
        folder = tmp_path / "paloma" / "c4_en" / split
        folder.mkdir(parents=True)
        with gzip.open(folder / f"{split}_00000000.jsonl.gz", "wt") as f:
            f.write(_jsonl_lines([{"text": text, "id": "1", "source": "c4_en"}]))
    assert [d.text for d in load_corpus("paloma", subset="c4_en", data_dir=str(tmp_path))] == ["scored"]
    with pytest.raises(ValueError, match=r"corpus 'paloma' needs a subset \(subset= / --subset\), one of: "
                                         r"4chan_meta_sep, c4_100_domains, c4_en"):
        load_corpus("paloma", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"could not load corpus \"paloma \(subset 'gab'\)\".*paloma/gab/test/"
                                         r"\*\.jsonl\.gz.*load_dataset\('allenai/paloma', 'gab'"):
        load_corpus("paloma", subset="gab", data_dir=str(tmp_path))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_tinystories_validation(tmp_path, suffix):
    (tmp_path / "tinystories").mkdir()
    stories = ["Once upon a time, Lily.", "Tom had a red ball."]
    if suffix == "jsonl":
        (tmp_path / "tinystories" / "validation.jsonl").write_text(_jsonl_lines({"text": s} for s in stories))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": stories}), tmp_path / "tinystories" / "validation.parquet")
    assert [d.text for d in load_corpus("tinystories", data_dir=str(tmp_path))] == stories


# -- each name absent and offline -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CORPORA))
def test_absent_and_offline_says_what_was_tried_and_where_a_copy_goes(tmp_path, name):
    corpus = CORPORA[name]
    subset = corpus.subsets[1] if corpus.subset_required else None
    with pytest.raises(ValueError) as err:
        load_corpus(name, data_dir=str(tmp_path), subset=subset)
    msg = str(err.value)
    first_local = corpus.local[0].format(subset=subset)
    assert msg.startswith("could not load corpus") and f"local files {first_local}" in msg
    assert f"under {tmp_path} (none exists)" in msg and "set LMLOSS_DATA_DIR" in msg
    if corpus.url:
        assert f"download of {corpus.url}" in msg and "Offline mode is enabled" in msg
    else:
        assert re.search(rf"load_dataset\('{re.escape(corpus.hub[0])}'.* not tried: its rows stream from the hub, "
                         r"and offline mode is set", msg)


def test_no_folder_at_all_is_said(monkeypatch):
    monkeypatch.delenv("LMLOSS_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match=r"Tried: no local folder \(data_dir / \$LMLOSS_DATA_DIR unset\); "
                                         r"download of http://mattmahoney\.net/dc/text8\.zip"):
        load_corpus("text8")


def test_corpora_module_is_the_table_data_module_reexports(monkeypatch):
    import lmloss.data

    assert lmloss.data.CORPORA is corpora.CORPORA


def test_tail_split_names_the_offset_of_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abcdef\xffgh")
    with pytest.raises(ValueError, match=r"is not UTF-8 at byte offset 6 of the file"):
        tail_split(path, 5)
