"""Fault campaign: random kills and random damage to an evaluation's checkpoint, each resumed with
lmloss eval --resume. Every case must end in one of two ways: totals and per-document rows
bit-identical to an uninterrupted run (recovered), or exit 2 with a message, no results file and the
checkpoint left as it was (refused). Never exit 0 with other numbers."""
import collections
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmloss import cli_eval as eval_script
from lmloss.checkpoint import Checkpoint, checkpoint_path

pytestmark = pytest.mark.usefixtures("one_thread")
OUTCOMES = collections.Counter()  # (kind, outcome) -> cases


@pytest.fixture(scope="module")
def campaign(tiny_model, assets, tmp_path_factory, one_thread):
    """A 10-document corpus, an uninterrupted run's results, and the full checkpoint it wrote."""
    root = tmp_path_factory.mktemp("faults")
    lines = (assets / "corpora" / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:9]
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(lines[:4] + [json.dumps({"text": ""})] + lines[4:]) + "\n")
    out = root / "r.json"
    argv = ["--model", tiny_model, "--tokenizer", str(assets / "tokenizers" / "hf-gpt2"),
            "--dataset", str(corpus), "--max-length", "32", "--batch-size", "3", "--no-progress",
            "--bootstrap", "0", "--output", str(out)]
    mp = pytest.MonkeyPatch()
    mp.setattr(eval_script, "checkpoint_files", lambda base: [])  # the command keeps the checkpoint
    try:
        assert eval_script.main(argv) == 0
    finally:
        mp.undo()
    ref = json.loads(out.read_text())
    full = checkpoint_path(out).read_bytes()
    out.unlink()
    checkpoint_path(out).unlink()
    assert full.count(b"\n") == 1 + 10
    return dict(argv=argv, out=out, corpus=corpus, ref=ref, full=full)


def _row_line(header: bytes, **row) -> bytes:
    """A checkpoint line with a valid checksum, as another run could have written it."""
    fp = json.loads(header)["fingerprint"]
    tmp = Path(__import__("tempfile").mkdtemp()) / "c.jsonl"
    with Checkpoint(tmp, fp) as ck:
        ck.append(row)
    line = tmp.read_bytes().splitlines(keepends=True)[1]
    shutil.rmtree(tmp.parent)
    return line


def _damage(kind: str, seed: int, full: bytes, corpus: Path) -> bytes:
    """The checkpoint a run killed or damaged this way leaves; a 'stale' case also edits the corpus."""
    rnd = random.Random(seed)
    lines = full.splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    if kind == "kill":  # the file is written in order: a kill leaves a prefix
        return full[:rnd.randrange(len(full) + 1)]
    if kind == "bitflip":
        data = bytearray(full)
        data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        return bytes(data)
    if kind == "delete":
        del rows[rnd.randrange(len(rows))]
    elif kind == "shuffle":
        rnd.shuffle(rows)
    elif kind == "duplicate":
        rows.insert(rnd.randrange(len(rows) + 1), rows[rnd.randrange(len(rows))])
    elif kind == "swap_nll":
        a, b = rnd.sample(range(len(rows)), 2)
        ra, rb = json.loads(rows[a]), json.loads(rows[b])
        ra["nll_nats"], rb["nll_nats"] = rb["nll_nats"], ra["nll_nats"]
        rows[a], rows[b] = (json.dumps(r).encode() + b"\n" for r in (ra, rb))
    elif kind == "extra":
        row = json.loads(rnd.choice(rows))
        del row["checksum"]
        if rnd.random() < 0.5:
            row["index"] = 10 + rnd.randrange(1000)  # past the corpus
        else:
            row.update(index=(row["index"] + 1) % 10)  # another document's sums and hash
        rows.pop(rnd.randrange(len(rows)))
        rows.insert(rnd.randrange(len(rows) + 1), _row_line(header, **row))
    elif kind == "stale":
        texts = corpus.read_text().splitlines()
        i = rnd.randrange(len(texts))
        if rnd.random() < 0.5:
            texts[i] = json.dumps({"text": json.loads(texts[i])["text"] + " changed"})
        else:
            del texts[i]
        corpus.write_text("\n".join(texts) + "\n")
        rows = rows[:rnd.randrange(len(rows) + 1)]
    return header + b"".join(rows)


EXPECTED = {"kill": "recovered", "delete": "recovered", "shuffle": "recovered", "duplicate": "refused",
            "swap_nll": "refused", "extra": "refused", "stale": "refused", "bitflip": None}


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(EXPECTED)), seed=st.integers(0, 2**32 - 1))
def test_a_damaged_or_killed_run_is_recovered_exactly_or_refused(campaign, kind, seed, capsys):
    out, corpus = campaign["out"], campaign["corpus"]
    original_corpus = corpus.read_bytes()
    ckpt = checkpoint_path(out)
    try:
        ckpt.write_bytes(_damage(kind, seed, campaign["full"], corpus))
        before = ckpt.read_bytes()
        rc = eval_script.main(campaign["argv"] + ["--resume"])
        err = capsys.readouterr().err
        if rc == 0:
            got = json.loads(out.read_text())
            assert got["totals"] == campaign["ref"]["totals"]
            assert got["documents"] == campaign["ref"]["documents"]
            assert not ckpt.exists()
            outcome = "recovered"
        else:
            assert rc == 2 and "error: " in err and "Traceback" not in err, err
            assert not out.exists() and ckpt.read_bytes() == before
            outcome = "refused"
        assert EXPECTED[kind] in (None, outcome), (kind, seed, err)
        OUTCOMES[kind, outcome] += 1
    finally:
        corpus.write_bytes(original_corpus)
        out.unlink(missing_ok=True)
        for p in out.parent.glob(out.name + ".partial*"):
            p.unlink()


def test_campaign_tried_every_kind_and_both_outcomes():
    if not OUTCOMES:
        pytest.skip("run together with the campaign above")
    print("\nfault campaign:", dict(sorted(OUTCOMES.items())), "cases:", sum(OUTCOMES.values()))
    kinds = {k for k, _ in OUTCOMES}
    assert kinds == set(EXPECTED)
    assert sum(n for (_, o), n in OUTCOMES.items() if o == "refused") >= 10
    assert sum(n for (_, o), n in OUTCOMES.items() if o == "recovered") >= 10
