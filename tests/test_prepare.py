"""lmloss.prepare: tokens, windows and counts against counts made here from the text; batches that
hold every window once and every scored target once, each at the input that predicts it; and
evaluate and kl_divergence reading the very same inputs."""
import importlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmloss.data import Document
from lmloss.models import load_model
from lmloss.prepare import Batch, _batch_order, batches, check_inputs, prepare
from lmloss.windows import Window, plan_windows

VOCAB, BOS, EOS = 259, 256, 257
P = 7  # the prefix token of the synthetic token lists below (their tokens are >= 1000, pad is 0)
TEXTS = ["", "a", "naïve café, 東京", "the cat sat on the mat " * 5, "é" * 40, "x\ny\n" * 9]


class ByteTokenizer:
    """Token ids are UTF-8 bytes; 256 is BOS, 257 EOS; each byte id stands for one byte."""

    name, vocab_size, bos_id, eos_id, byte_exact = "bytes", VOCAB, BOS, EOS, True

    def encode(self, text):
        return list(text.encode("utf-8"))

    def byte_lengths(self):
        return [1] * 256 + [0] * (VOCAB - 256)


@pytest.fixture(scope="module")
def docs():
    return [Document(t, name=f"d{i}") for i, t in enumerate(TEXTS)]


def _synthetic(lengths):
    """Token lists whose every token names its place: 1000 * (doc + 1) + position."""
    return [[1000 * (d + 1) + p for p in range(n)] for d, n in enumerate(lengths)]


# --- prepare ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bos_in_tokens", [False, True])
def test_prepare_lm_eval_counts_the_whole_text(docs, bos_in_tokens):
    prep = prepare(ByteTokenizer(), docs, vocab_size=VOCAB, plan="lm-eval", max_length=16, prefix_id=EOS,
                   bos_in_tokens=bos_in_tokens)
    head = [BOS] if bos_in_tokens else []
    assert prep.tokens == [head + list(t.encode("utf-8")) for t in TEXTS]
    assert prep.windows == plan_windows([len(t) for t in prep.tokens], plan="lm-eval", max_length=16, prefix_id=EOS)
    assert prep.counts == [(d.n_bytes, d.n_words, d.n_chars) for d in docs]  # the Documents' own
    assert [(c[0], c[2]) for c in prep.counts] == [(len(t.encode("utf-8")), len(t)) for t in TEXTS]
    assert prep.doc_windows() == [[i for i, w in enumerate(prep.windows) if w.doc == d] for d in range(len(TEXTS))]


def test_prepare_chunks_counts_the_scored_text_only(docs):
    prep = prepare(ByteTokenizer(), docs, vocab_size=VOCAB, plan="chunks", max_length=8, score_from=3)
    # byte ids: a scored token is one byte of the text, and starts a character unless it is 10xxxxxx
    expected = [[0, 0, 0] for _ in TEXTS]
    for w in prep.windows:
        raw = TEXTS[w.doc].encode("utf-8")
        scored = raw[w.stop + 1 - w.n_scored:w.stop + 1]
        assert w.n_scored == 8 - 1 - 3 and len(scored) == w.n_scored
        expected[w.doc][0] += len(scored)
        expected[w.doc][2] += sum(1 for c in scored if c >> 6 != 0b10)
    assert prep.counts == [tuple(c) for c in expected]
    assert sum(c[0] for c in prep.counts) == sum(w.n_scored for w in prep.windows) > 0


def test_prepare_and_check_inputs_errors(docs):
    class NoBos(ByteTokenizer):
        bos_id = None

    with pytest.raises(TypeError, match="lmloss Documents"):
        check_inputs(ByteTokenizer(), ["plain text"])
    with pytest.raises(ValueError, match="has no BOS token"):
        check_inputs(NoBos(), docs, bos_in_tokens=True)
    with pytest.raises(ValueError, match="has no BOS token"):
        prepare(NoBos(), docs, vocab_size=VOCAB, max_length=16, prefix_id=EOS, bos_in_tokens=True)
    # doc_ids name the documents by their corpus index: "é" encodes to ids up to 0xC3 = 195
    with pytest.raises(ValueError, match=r"gives id 195 in document 12, past the model's 150 embedding rows"):
        prepare(ByteTokenizer(), docs[3:5], vocab_size=150, max_length=16, prefix_id=EOS, doc_ids=[11, 12])


# --- batches ----------------------------------------------------------------------------------------

def test_batch_order_groups_documents_then_sorts_by_length():
    lengths = [(0, 3), (0, 9), (1, 5), (1, 7), (2, 2), (3, 8)]  # (doc, n_inputs)
    windows = [Window(doc, 0, n, 1) for doc, n in lengths]
    # groups of at least 3 windows of whole documents: {0, 1} and {2, 3}; longest first inside
    assert _batch_order(windows, group_size=3) == [1, 3, 2, 0, 5, 4]
    assert _batch_order(windows, group_size=100) == [1, 5, 3, 2, 0, 4]


PLANS = [("lm-eval", dict(prefix_id=P), 0), ("lm-eval", dict(prefix_id=P, every_window=True), 0),
         ("sliding", dict(stride=3), 1), ("sliding", dict(stride=5, prefix_id=P), 0)]


@pytest.mark.parametrize("plan,options,context_only", PLANS)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batches_hold_every_window_and_every_scored_target_once(plan, options, context_only, batch_size):
    lengths = [0, 1, 2, 9, 10, 11, 37, 3, 25]
    tokens = _synthetic(lengths)
    windows = plan_windows(lengths, plan=plan, max_length=10, **options)
    seen_windows, seen_targets = [], []
    for b in batches(windows, tokens, batch_size=batch_size):
        assert isinstance(b, Batch) and 1 <= len(b.indices) <= batch_size
        assert b.ids.shape == (len(b.indices), max(windows[i].n_inputs for i in b.indices))
        assert b.n_scored == [windows[i].n_scored for i in b.indices] and sum(b.n_scored) == b.targets.numel()
        for r, i in enumerate(b.indices):  # right padding with 0 after each window's inputs
            n = windows[i].n_inputs
            assert (b.ids[r, :n] != 0).all() and (b.ids[r, n:] == 0).all()
            assert (b.rows[sum(b.n_scored[:r]):sum(b.n_scored[:r + 1])] == r).all()
        for r, c, t in zip(b.rows.tolist(), b.cols.tolist(), b.targets.tolist()):
            # the input at (r, c) predicts t: the token before it in its document, or the prefix
            assert b.ids[r, c] == (t - 1 if t % 1000 else P) or (c == 0 and b.ids[r, c] == P)
        seen_windows += b.indices
        seen_targets += b.targets.tolist()
    assert sorted(seen_windows) == list(range(len(windows)))
    assert sorted(seen_targets) == sorted(t for doc in tokens for t in doc[context_only:])


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batches_skip_leaves_out_only_batches_of_skipped_windows(batch_size):
    lengths = [5, 30, 2, 19, 0, 12, 40]
    tokens = _synthetic(lengths)
    windows = plan_windows(lengths, plan="lm-eval", max_length=8, prefix_id=P)
    skip = frozenset(i for i, w in enumerate(windows) if w.doc in (1, 3, 6))
    full = list(batches(windows, tokens, batch_size=batch_size))
    kept = list(batches(windows, tokens, batch_size=batch_size, skip=skip))
    expected = [b for b in full if not set(b.indices) <= skip]
    assert len(expected) < len(full) and len(kept) == len(expected)
    for b, e in zip(kept, expected):  # whole batches, the same as without skip
        assert b.indices == e.indices and b.n_scored == e.n_scored
        assert all(torch.equal(x, y) for x, y in zip(b[1:5], e[1:5]))


def test_batches_errors():
    windows = plan_windows([5], plan="lm-eval", max_length=4, prefix_id=P)
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            next(batches(windows, _synthetic([5]), batch_size=bad))


# --- evaluate and kl_divergence read the same inputs ------------------------------------------------

@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("plan,options", [("lm-eval", dict(bos_in_tokens=True)), ("sliding", dict(stride=5)),
                                          ("chunks", dict(score_from=2))])
def test_evaluate_and_kl_divergence_see_the_same_tokens_windows_and_batches(docs, plan, options, monkeypatch):
    evaluate_mod = importlib.import_module("lmloss.evaluate")  # the module, not lmloss.evaluate the function
    compare_mod = importlib.import_module("lmloss.compare")
    seen = {"evaluate": [], "compare": []}

    def recording(module, key):
        real_prepare, real_batches = module.prepare, module.batches

        def prepare_(*args, **kwargs):
            prep = real_prepare(*args, **kwargs)
            seen[key].append(prep)
            return prep

        def batches_(*args, **kwargs):
            for b in real_batches(*args, **kwargs):
                seen[key].append(b)
                yield b

        monkeypatch.setattr(module, "prepare", prepare_)
        monkeypatch.setattr(module, "batches", batches_)

    recording(evaluate_mod, "evaluate")
    recording(compare_mod, "compare")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model, other = (load_model(GPT2LMHeadModel(cfg), device="cpu") for _ in range(2))
    run = dict(plan=plan, max_length=12, batch_size=3, progress=False, **options)
    result = evaluate_mod.evaluate(model, ByteTokenizer(), docs, **run)
    kl = compare_mod.kl_divergence(model, other, ByteTokenizer(), docs, **run)
    ours, theirs = seen["evaluate"], seen["compare"]
    assert len(ours) == len(theirs) > 2 and ours[0] == theirs[0]  # the Prepared: tokens, windows, counts
    assert result.windows == ours[0].windows and kl.config["n_windows"] == len(ours[0].windows)
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.indices == b.indices and a.n_scored == b.n_scored
        assert all(torch.equal(x, y) for x, y in zip(a[1:5], b[1:5]))
    assert [d.totals.n_bytes for d in result.per_document] == [d.reference.n_bytes for d in kl.per_document]
