"""Checkpoint: verified rows, torn-line recovery, exact float round trip, refusal of anything it
cannot vouch for (another configuration, a corrupt or edited line, a row that is not its document's)."""
import json
import random

import pytest

from lmloss.checkpoint import (Checkpoint, check_rows, checkpoint_files, checkpoint_path, count_rows,
                               read_checkpoint, text_sha256)
from lmloss.data import Document

FP = {"model": "m", "dataset": "wikitext", "max_length": 1024, "dtype": "float32", "lmloss": "0.1.0"}
DOCS = [Document(f"document number {i} " * (i + 1)) for i in range(6)]


def _row(i):
    d = DOCS[i]
    return {"index": i, "name": "", "nll_nats": random.Random(i).random() * 1e4, "n_tokens": i + 1,
            "n_bytes": d.n_bytes, "n_words": d.n_words, "n_chars": d.n_chars, "text_sha256": text_sha256(d.text)}


def _written(tmp_path, n=5):
    p = tmp_path / "c.jsonl"
    with Checkpoint(p, FP) as ck:
        for i in range(n):
            ck.append(_row(i))
    return p


def test_path_next_to_output(tmp_path):
    assert checkpoint_path(tmp_path / "r.json") == tmp_path / "r.json.partial.jsonl"
    assert checkpoint_path(tmp_path / "r.json", rank=2) == tmp_path / "r.json.partial.rank2.jsonl"


def test_checkpoint_files_of_an_output_with_glob_characters(tmp_path):
    out = tmp_path / "run[1].json"
    for rank in (0, 3):
        Checkpoint(checkpoint_path(out, rank), FP).close()
    Checkpoint(checkpoint_path(tmp_path / "run1.json"), FP).close()  # '[1]' must not match '1'
    assert checkpoint_files(checkpoint_path(out)) == [checkpoint_path(out), checkpoint_path(out, 3)]
    assert checkpoint_files(tmp_path / "none.jsonl") == []


def test_rows_read_back_bit_exact(tmp_path):
    p = _written(tmp_path)
    rows = read_checkpoint(p, FP)
    assert sorted(rows) == list(range(5)) and all(rows[i] == _row(i) for i in range(5))
    with Checkpoint(p, FP, keep=True) as ck:
        ck.append(_row(5))
    assert sorted(read_checkpoint(p, FP)) == list(range(6)) and count_rows(p) == 6


def test_torn_last_line_is_dropped_and_a_torn_header_holds_no_rows(tmp_path):
    p = _written(tmp_path, 2)
    with open(p, "a") as f:
        f.write(json.dumps(_row(2))[:17])  # killed mid-write
    assert sorted(read_checkpoint(p, FP)) == [0, 1]
    with Checkpoint(p, FP, keep=True) as ck:
        ck.append(_row(2))
    assert sorted(read_checkpoint(p, FP)) == [0, 1, 2]
    p.write_bytes(p.read_bytes()[:20])  # killed while writing the header
    assert read_checkpoint(p, FP) == {} and count_rows(p) == 0


def test_refuses_other_configuration(tmp_path):
    p = _written(tmp_path, 1)
    with pytest.raises(ValueError, match=r"max_length: checkpoint has 1024, this run has 512"):
        read_checkpoint(p, {**FP, "max_length": 512})


def _lines(p):
    return p.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("damage, match", [
    (lambda ls: ls[:2] + [b"garbage\n"] + ls[2:], r"corrupt at line 3 .*not JSON"),
    (lambda ls: ls[:2] + [ls[2].replace(b'"nll_nats": ', b'"nll_nats": 1')] + ls[3:], "checksum"),
    (lambda ls: ls[:3] + [ls[2]] + ls[3:], "document 1 is recorded twice"),
    (lambda ls: [ls[0].replace(b"1024", b"2048")] + ls[1:], "corrupt at line 1 .*checksum"),
    (lambda ls: ls[:2] + [b"[1, 2]\n"] + ls[2:], "checksum"),
])
def test_refuses_a_damaged_line_anywhere(tmp_path, damage, match):
    p = _written(tmp_path)
    p.write_bytes(b"".join(damage(_lines(p))))
    with pytest.raises(ValueError, match=match):
        read_checkpoint(p, FP)


def test_refuses_a_malformed_row_with_a_valid_checksum(tmp_path):
    p = tmp_path / "c.jsonl"
    with Checkpoint(p, FP) as ck:
        ck._write({"index": 0, "nll_nats": "12"})  # as if written by another program
    with pytest.raises(ValueError, match="malformed row: nll_nats '12'"):
        read_checkpoint(p, FP)
    with pytest.raises(ValueError, match="not a document row: index -1"):
        Checkpoint(p, FP).append({**_row(0), "index": -1})


def test_refuses_a_checkpoint_of_an_older_version(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"kind": "lmloss-checkpoint-v1", "fingerprint": FP}) + "\n")
    with pytest.raises(ValueError, match="not an lmloss checkpoint of this version .*lmloss-checkpoint-v1"):
        read_checkpoint(p, FP)


def test_rows_must_match_their_documents():
    rows = {i: _row(i) for i in range(3)}
    check_rows(rows, DOCS)
    with pytest.raises(ValueError, match="document 9 is out of range: the corpus has 6"):
        check_rows({9: {**_row(0), "index": 9}}, DOCS)
    changed = DOCS[:1] + [Document(DOCS[1].text.upper())] + DOCS[2:]
    with pytest.raises(ValueError, match="document 1 does not match .*text_sha256"):
        check_rows(rows, changed)
    with pytest.raises(ValueError, match="n_bytes: checkpoint 7, corpus"):
        check_rows({0: {**_row(0), "n_bytes": 7}}, DOCS)
