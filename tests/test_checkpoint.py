"""Checkpoint: durable rows, torn-line recovery, exact float round trip, refusal on a config change."""
import json
import random

import pytest

from lmloss.checkpoint import Checkpoint, checkpoint_path

FP = {"model": "m", "dataset": "wikitext", "max_length": 1024, "dtype": "float32", "lmloss": "0.1.0"}


def _row(i):
    rnd = random.Random(i)
    return {"index": i, "nll_nats": rnd.random() * 1e4, "n_tokens": i + 1, "n_bytes": 3 * i + 5, "n_words": i}


def test_path_next_to_output(tmp_path):
    assert checkpoint_path(tmp_path / "r.json") == tmp_path / "r.json.partial.jsonl"
    assert checkpoint_path(tmp_path / "r.json", rank=2) == tmp_path / "r.json.partial.rank2.jsonl"


def test_resume_reads_back_exact_rows(tmp_path):
    p = tmp_path / "c.jsonl"
    with Checkpoint(p, FP, resume=False) as ck:
        for i in range(5):
            ck.append(_row(i))
    with Checkpoint(p, FP, resume=True) as ck:
        assert sorted(ck.rows) == list(range(5))
        assert all(ck.rows[i] == _row(i) for i in range(5))  # float64 bit-exact through JSON
        ck.append(_row(5))
    assert len(Checkpoint(p, FP, resume=True).rows) == 6


def test_torn_last_line_is_dropped(tmp_path):
    p = tmp_path / "c.jsonl"
    with Checkpoint(p, FP, resume=False) as ck:
        ck.append(_row(0))
        ck.append(_row(1))
    with open(p, "a") as f:
        f.write(json.dumps(_row(2))[:17])  # killed mid-write
    ck = Checkpoint(p, FP, resume=True)
    assert sorted(ck.rows) == [0, 1]
    ck.append(_row(2))
    ck.close()
    assert sorted(Checkpoint(p, FP, resume=True).rows) == [0, 1, 2]


def test_refuses_other_configuration(tmp_path):
    p = tmp_path / "c.jsonl"
    Checkpoint(p, FP, resume=False).close()
    with pytest.raises(ValueError, match=r"max_length: checkpoint has 1024, this run has 512"):
        Checkpoint(p, {**FP, "max_length": 512}, resume=True)


def test_without_resume_starts_over(tmp_path):
    p = tmp_path / "c.jsonl"
    with Checkpoint(p, FP, resume=False) as ck:
        ck.append(_row(0))
    assert Checkpoint(p, FP, resume=False).rows == {}
    assert Checkpoint(p, FP, resume=True).rows == {}
