"""The evaluation loop against float64 references written here, the HF guide's own labels= loss,
and, for the real SmolLM2 model, lm-evaluation-harness's number."""
import math
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmloss.data import Document
from lmloss.evaluate import evaluate
from lmloss.results import DocumentResult, bootstrap_ci
from lmloss.metrics import LossTotals
from lmloss.models import load_model

VOCAB, BOS, EOS = 259, 256, 257


class ByteTokenizer:
    """Token ids are UTF-8 bytes; 256 is BOS, 257 EOS."""

    name, vocab_size, bos_id, eos_id = "bytes", VOCAB, BOS, EOS

    def encode(self, text):
        return list(text.encode("utf-8"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    return load_model(GPT2LMHeadModel(cfg), device="cpu")


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "é", "on", "mat", "\n", "naïve", "42"]
    lengths = [0, 1, 2, 17, 40, 64, 65, 130, 33, 200]
    return [Document(" ".join(rng.choice(words) for _ in range(n // 3 + (n > 0))), name=f"d{i}")
            for i, n in enumerate(lengths)]


def _reference_lm_eval(module, tokens, max_length, prefix):
    """float64 NLL per document: targets in blocks of max_length, each predicted from the
    max_length inputs of [prefix] + tokens before the block's last target."""
    out = []
    for toks in tokens:
        ext, total = [prefix] + toks, 0.0
        for p in range(0, len(toks), max_length):
            c = min(max_length, len(toks) - p)
            end = p + c  # inputs ext[end - max_length:end] predict ext[1:end + 1]'s last c
            inputs = ext[max(0, end - max_length):end]
            with torch.inference_mode():
                logits = module(torch.tensor([inputs])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)[-c:]
            total -= logp.gather(1, torch.tensor(ext[end - c + 1:end + 1])[:, None]).sum().item()
        out.append(total)
    return out


def test_lm_eval_plan_equals_a_float64_reference(model, docs):
    tok = ByteTokenizer()
    res = evaluate(model, tok, docs, plan="lm-eval", max_length=16, batch_size=5, progress=False)
    want = _reference_lm_eval(model.module, [tok.encode(d.text) for d in docs], 16, BOS)
    got = [r.totals.nll_nats for r in res.per_document]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert [r.totals.n_tokens for r in res.per_document] == [len(tok.encode(d.text)) for d in docs]
    assert [r.totals.n_bytes for r in res.per_document] == [len(d.text.encode()) for d in docs]
    assert res.totals.nll_nats == pytest.approx(sum(want), rel=1e-6)
    assert res.totals.n_words == sum(d.n_words for d in docs)


@pytest.mark.parametrize("plan, kw", [("lm-eval", {}), ("sliding", {"stride": 7}),
                                      ("sliding", {"stride": 16, "every_window": True})])
def test_batch_size_does_not_change_the_numbers(model, docs, plan, kw):
    runs = [evaluate(model, ByteTokenizer(), docs, plan=plan, max_length=16, batch_size=bs,
                     progress=False, **kw) for bs in (1, 3, 16)]
    for r in runs[1:]:
        assert r.totals.nll_nats == pytest.approx(runs[0].totals.nll_nats, rel=1e-6)
        assert r.totals.n_tokens == runs[0].totals.n_tokens
        for a, b in zip(r.per_document, runs[0].per_document):
            assert a.totals.nll_nats == pytest.approx(b.totals.nll_nats, rel=1e-6, abs=1e-9)


def test_hf_sliding_window_losses_equal_the_models_labels_loss(model):
    """The HF perplexity guide's loop, verbatim in spirit: labels= loss of each window."""
    tok = ByteTokenizer()
    stream = Document("The quick brown fox jumps over the lazy dog. " * 6)
    ids = tok.encode(stream.text)
    max_length, stride = 32, 12
    res = evaluate(model, tok, [stream], plan="sliding", max_length=max_length, stride=stride,
                   batch_size=3, progress=False)
    seq, prev_end, losses, counts = torch.tensor([ids]), 0, [], []
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.inference_mode():
            losses.append(model.module(input_ids, labels=labels).loss.item())
        counts.append(int((labels[:, 1:] != -100).sum()))
        prev_end = end
        if end == len(ids):
            break
    assert [w.n_scored for w in res.windows] == counts
    got = [nll / w.n_scored for nll, w in zip(res.window_nll_nats, res.windows)]
    assert got == pytest.approx(losses, rel=1e-5)
    # token-weighted total, not a mean of window means
    assert res.totals.nll_nats == pytest.approx(sum(l * c for l, c in zip(losses, counts)), rel=1e-5)
    assert res.totals.n_tokens == len(ids) - 1


def test_fused_head_agrees_with_the_models_own_logits(model, docs):
    """The fused linear cross-entropy on hidden states against token_nll on model(ids).logits."""
    tok = ByteTokenizer()
    base = evaluate(model, tok, docs, max_length=16, batch_size=4, head_impl="fused", progress=False)
    no_head = load_model(model.module, device="cpu")
    no_head.head = None
    via_logits = evaluate(no_head, tok, docs, max_length=16, batch_size=4, progress=False)
    assert via_logits.totals.nll_nats == pytest.approx(base.totals.nll_nats, rel=1e-6)


def test_callbacks_token_dump_and_positions(model, docs):
    seen = []
    res = evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=4, keep_token_nll=True,
                   progress=False, on_document=seen.append)
    assert sorted(r.index for r in seen) == list(range(len(docs)))
    assert sorted(seen, key=lambda r: r.index) == res.per_document
    assert sorted(res.token_nll) == list(range(len(docs)))
    for row in res.per_document:
        nll = res.token_nll[row.index]
        assert nll.dtype == torch.float32 and nll.numel() == row.totals.n_tokens
        assert nll.double().sum().item() == pytest.approx(row.totals.nll_nats, rel=1e-6, abs=1e-9)
    assert sum(res.position_count) == res.totals.n_tokens
    assert sum(res.position_nll_nats) == pytest.approx(res.totals.nll_nats, rel=1e-9)


def _doc(i, nll, k):
    return DocumentResult(i, "", LossTotals(nll, k, 4 * k, k, 0), "0")


def test_bootstrap_ci():
    rows = [_doc(i, 2.0 * k, k) for i, k in enumerate((1, 5, 9))]
    ci = bootstrap_ci(rows, n_resamples=200)
    # every document has the same ratios, so every resample gives the same value
    assert ci["token_perplexity"] == pytest.approx((math.e**2, math.e**2))
    assert ci["bits_per_byte"] == pytest.approx((0.5 / math.log(2),) * 2)
    rows[0] = _doc(0, 10.0, 1)
    lo, hi = bootstrap_ci(rows, n_resamples=500)["bits_per_byte"]
    point = sum(r.totals.nll_nats for r in rows) / (math.log(2) * sum(r.totals.n_bytes for r in rows))
    assert lo < point < hi
    assert bootstrap_ci(rows[:1]) == {}


def test_errors(model, docs):
    with pytest.raises(ValueError, match="above the model's context length 64"):
        evaluate(model, ByteTokenizer(), docs, max_length=65, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, ByteTokenizer(), docs, max_length=8, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="lmloss Documents"):
        evaluate(model, ByteTokenizer(), ["plain string"], max_length=8, progress=False)
    with pytest.raises(ValueError, match="head_impl"):
        evaluate(model, ByteTokenizer(), docs, max_length=8, head_impl="magic", progress=False)


# --- the real model: SmolLM2-135M (GGUF, conftest's smollm2), loaded once for this module ----------

# lm-evaluation-harness 0.4.13, its `wikitext` task (HFLM, gguf_file=..., dtype=float32,
# max_length=1024, batch_size=1) on the first page, "= Robert Boulter =": the log-likelihood it logs.
LM_EVAL_FIRST_PAGE_LOGLIKELIHOOD = -3532.8555908203125


@pytest.mark.slow
def test_smollm2_first_wikitext_page_equals_lm_evaluation_harness(smollm2, assets):
    import lmloss

    model, tok = smollm2
    assert model.context_length == 8192 and model.head is not None and tok.bos_id is not None
    docs = lmloss.load_corpus("wikitext", form="pages", detokenize=True,
                              data_dir=str(assets / "corpora"), limit=1)
    res = evaluate(model, tok, docs, plan="lm-eval", max_length=1024, batch_size=2, progress=False)
    assert -res.per_document[0].totals.nll_nats == pytest.approx(LM_EVAL_FIRST_PAGE_LOGLIKELIHOOD, rel=1e-4)
    assert res.per_document[0].totals.n_bytes == len(docs[0].original.encode("utf-8"))


@pytest.mark.parametrize("batch_size", [3, 4])
def test_resumed_documents_are_bit_identical_to_an_uninterrupted_run(model, docs, batch_size, tmp_path):
    """A resumed run forms the batches of the whole run, so re-scored documents keep their batch
    neighbours: every document equals the uninterrupted run's bit for bit, wherever the run stopped
    (a kill leaves a prefix of the checkpoint, a torn last line included)."""
    ckpt = tmp_path / "run.jsonl"
    full = evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=batch_size, progress=False,
                    checkpoint=ckpt)
    written = ckpt.read_bytes()
    lines = written.splitlines(keepends=True)
    assert len(lines) == 1 + len(docs)
    again = evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=batch_size, progress=False,
                     checkpoint=ckpt)  # everything restored, nothing scored
    assert again.resumed_documents == len(docs) and again.per_document == full.per_document
    for k in range(1, len(docs)):  # killed after k documents, the next one torn mid-line
        ckpt.write_bytes(b"".join(lines[:1 + k]) + lines[1 + k][:20])
        scored = []
        res = evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=batch_size, progress=False,
                       checkpoint=ckpt, on_document=scored.append)
        assert res.per_document == full.per_document and res.totals == full.totals
        assert res.resumed_documents == k and len(scored) == len(docs) - k
        assert sorted(ckpt.read_bytes().splitlines()) == sorted(written.splitlines())


def test_a_checkpoint_of_other_settings_or_another_corpus_is_refused(model, docs, tmp_path):
    ckpt = tmp_path / "run.jsonl"
    evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=2, progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="max_length: checkpoint has 16, this run has 8"):
        evaluate(model, ByteTokenizer(), docs, max_length=8, progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="corpus_sha256: checkpoint has"):
        evaluate(model, ByteTokenizer(), docs[:-1] + [Document("changed")], max_length=16, progress=False,
                 checkpoint=ckpt)


def test_a_row_whose_token_count_is_not_its_documents_is_refused(model, docs, tmp_path):
    """A well-formed row (valid checksum, right text hash and counts) that claims another token count."""
    import json

    from lmloss.checkpoint import Checkpoint

    ckpt = tmp_path / "run.jsonl"
    evaluate(model, ByteTokenizer(), docs, max_length=16, batch_size=2, progress=False, checkpoint=ckpt)
    header, *rows = [json.loads(line) for line in ckpt.read_text().splitlines()]
    with Checkpoint(ckpt, header["fingerprint"]) as ck:
        for row in rows:
            del row["checksum"]
            ck.append({**row, "n_tokens": 99} if row["index"] == 3 else row)
    with pytest.raises(ValueError, match="document 3 says 99 tokens, .*this run scores"):
        evaluate(model, ByteTokenizer(), docs, max_length=16, progress=False, checkpoint=ckpt)


class _Tok(ByteTokenizer):
    def __init__(self, vocab_size=VOCAB, encode=None):
        self.vocab_size = vocab_size
        self._encode = encode

    def encode(self, text):
        return self._encode(text) if self._encode else super().encode(text)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(model, docs):
    with pytest.raises(ValueError, match="encodes document 1 .* to no tokens"):
        evaluate(model, _Tok(encode=lambda t: []), docs, max_length=16, progress=False)
    with pytest.raises(ValueError, match=f"gives id 300 in document 1, past the model's {VOCAB} embedding rows"):
        evaluate(model, _Tok(encode=lambda t: [300] * len(t)), docs, max_length=16, progress=False)
    with pytest.raises(ValueError, match=f"emits ids up to 299, but .* has {VOCAB} embedding rows"):
        evaluate(model, _Tok(vocab_size=300), docs, max_length=16, progress=False)


def test_a_run_that_scores_no_token_is_an_error(model):
    one_token = [Document("a"), Document("b")]  # sliding without a prefix: the one token is context
    with pytest.raises(ValueError, match="no token to score"):
        evaluate(model, ByteTokenizer(), one_token, plan="sliding", max_length=16, progress=False)
