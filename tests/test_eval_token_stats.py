"""evaluate(..., token_stats=True): entropy, top-1 and rank sums against a float64 loop over the
model's full logits, on both head paths; the NLL totals equal a run without statistics."""
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lmloss
from lmloss.data import Document
from lmloss.results import RANK_BUCKETS

VOCAB, BOS, EOS = 258, 256, 257
pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    name, vocab_size, bos_id, eos_id, add_bos = "bytes", VOCAB, BOS, EOS, False

    def encode(self, text):
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    return GPT2LMHeadModel(cfg).eval()


DOCS = [Document("Entropy is the expected surprise of a prediction. " * 3), Document("ok"),
        Document("Zoë's naïve café sells crêpes for €3 — twice a week.")]


def reference(model, docs, max_length):
    """Per scored token, from the windows' full float64 logits: (nll, entropy, rank)."""
    tok = ByteTokenizer()
    tokens = [tok.encode(d.text) for d in docs]
    rows = []
    for w in lmloss.plan_windows([len(t) for t in tokens], plan="lm-eval", max_length=max_length, prefix_id=BOS):
        inputs, targets = w.inputs(tokens[w.doc]), w.targets(tokens[w.doc])
        with torch.no_grad():
            z = model(torch.tensor([inputs])).logits[0].double()
        logp = z.log_softmax(-1)
        for j in range(len(inputs) - w.n_scored, len(inputs)):
            t = targets[j]
            rows.append((-logp[j, t].item(), -(logp[j].exp() * logp[j]).sum().item(), int((z[j] > z[j, t]).sum())))
    return np.array(rows)


@pytest.mark.parametrize("head_impl", ["fused", "logits"])
def test_token_stats_sums_match_a_float64_loop(model, head_impl):
    ref = reference(model, DOCS, max_length=24)
    res = lmloss.evaluate(model, ByteTokenizer(), DOCS, max_length=24, head_impl=head_impl, token_stats=True,
                          keep_token_nll=True, progress=False)
    plain = lmloss.evaluate(model, ByteTokenizer(), DOCS, max_length=24, head_impl=head_impl, progress=False)
    st = res.token_stats
    assert st["n_tokens"] == len(ref) == res.totals.n_tokens
    assert st["entropy_nats"] == pytest.approx(ref[:, 1].sum(), rel=1e-5)
    assert st["top1"] == int((ref[:, 2] == 0).sum()) and st["top1_accuracy"] == st["top1"] / len(ref)
    for lo, hi, label in RANK_BUCKETS:
        assert st["rank_counts"][label] == int(((ref[:, 2] >= lo) & (ref[:, 2] < (hi or np.inf))).sum())
    assert res.totals.nll_nats == pytest.approx(plain.totals.nll_nats, rel=1e-6)
    assert res.totals.nll_nats == pytest.approx(ref[:, 0].sum(), rel=1e-5)
    cols = res.token_columns
    got = np.concatenate([cols[i]["entropy"].numpy() for i in sorted(cols)])
    np.testing.assert_allclose(got, ref[:, 1], rtol=1e-4, atol=1e-5)
    assert np.concatenate([cols[i]["rank"].numpy() for i in sorted(cols)]).tolist() == ref[:, 2].astype(int).tolist()


def test_token_stats_off_by_default(model):
    res = lmloss.evaluate(model, ByteTokenizer(), DOCS[:1], max_length=24, progress=False)
    assert res.token_stats is None and res.token_columns is None
