"""Window plans: golden lists written by hand, and exact coverage of every target as a property."""
import pytest
from hypothesis import given, settings, strategies as st

from lmloss.windows import Window, plan_windows

P = -1  # the prefix token in the golden lists


def _pairs(windows, n):
    """(inputs, scored targets) of each window over the tokens 0..n-1."""
    tokens = list(range(n))
    return [(w.inputs(tokens), w.targets(tokens)[len(w.targets(tokens)) - w.n_scored:]) for w in windows]


def test_lm_eval_golden_matches_lm_evaluation_harness_rolling_windows():
    # lm-evaluation-harness's own test of get_rolling_token_windows (34 tokens, max_seq_len 10,
    # context_len 1), after make_disjoint_window: the inputs it feeds and the targets it scores.
    got = _pairs(plan_windows([34], plan="lm-eval", max_length=10, prefix_id=P), 34)
    assert got == [
        ([P, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]


def test_lm_eval_short_documents_and_document_indices():
    windows = plan_windows([3, 0, 10, 1], plan="lm-eval", max_length=10, prefix_id=P)
    assert [w.doc for w in windows] == [0, 2, 3]
    assert _pairs(windows[:1], 3) == [([P, 0, 1], [0, 1, 2])]
    assert _pairs(windows[1:2], 10) == [([P, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(10)))]
    assert _pairs(windows[2:], 1) == [([P], [0])]


def test_lm_eval_prefix_at_every_window():
    got = _pairs(plan_windows([25], plan="lm-eval", max_length=10, prefix_id=P, every_window=True), 25)
    assert got == [
        ([P, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([P, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([P, 15, 16, 17, 18, 19, 20, 21, 22, 23], [20, 21, 22, 23, 24]),
    ]


def test_sliding_golden_matches_the_hf_guide_loop():
    # HF guide, seq_len 10, max_length 4, stride 2: inputs seq[begin:begin+4] for begin = 0, 2, 4, 6;
    # labels of the first window all but token 0, then only the trg_len = end - prev_end new ones.
    # The last input of each window predicts nothing inside it and is dropped.
    got = _pairs(plan_windows([10], plan="sliding", max_length=4, stride=2), 10)
    assert got == [([0, 1, 2], [1, 2, 3]), ([2, 3, 4], [4, 5]), ([4, 5, 6], [6, 7]), ([6, 7, 8], [8, 9])]
    assert [w.min_context for w in plan_windows([10], plan="sliding", max_length=4, stride=2)] == [1, 2, 2, 2]


def test_sliding_stride_equal_to_max_length_keeps_every_boundary_token():
    # The HF loop with stride == max_length never scores tokens 4 and 8 here; lmloss starts each
    # window one token earlier so that they are predicted with one token of context.
    got = _pairs(plan_windows([9], plan="sliding", max_length=4, stride=4), 9)
    assert got == [([0, 1, 2], [1, 2, 3]), ([3, 4, 5], [4, 5, 6]), ([6, 7], [7, 8])]


def test_sliding_with_a_prefix_scores_the_first_token():
    got = _pairs(plan_windows([5], plan="sliding", max_length=4, stride=2, prefix_id=P), 5)
    assert got == [([P, 0, 1], [0, 1, 2]), ([1, 2, 3], [3, 4])]
    got = _pairs(plan_windows([7], plan="sliding", max_length=4, stride=2, prefix_id=P, every_window=True), 7)
    assert got == [([P, 0, 1, 2], [0, 1, 2, 3]), ([P, 2, 3, 4], [4, 5]), ([P, 4, 5], [6])]


@pytest.mark.parametrize("kwargs, match", [
    (dict(plan="rolling", max_length=4), "unknown window plan"),
    (dict(plan="lm-eval", max_length=4), "needs prefix_id"),
    (dict(plan="sliding", max_length=4, stride=5), "stride must be"),
    (dict(plan="sliding", max_length=4, stride=0), "stride must be"),
    (dict(plan="sliding", max_length=1, stride=1), "max_length >= 2"),
    (dict(plan="lm-eval", max_length=0, prefix_id=P), "max_length must be"),
    (dict(plan="lm-eval", max_length=4, stride=2, prefix_id=P), "stride is for"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_windows([10], **kwargs)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), max_size=5), plan=st.sampled_from(["lm-eval", "sliding"]),
       max_length=st.integers(2, 12), stride_frac=st.floats(0.01, 1.0), prefix=st.booleans(),
       every_window=st.booleans())
def test_every_target_is_scored_exactly_once(lengths, plan, max_length, stride_frac, prefix, every_window):
    prefix = prefix or plan == "lm-eval" or every_window
    stride = max(1, round(stride_frac * max_length)) if plan == "sliding" else None
    windows = plan_windows(lengths, plan=plan, max_length=max_length, stride=stride,
                           prefix_id=P if prefix else None, every_window=every_window)
    for doc, n in enumerate(lengths):
        mine = [w for w in windows if w.doc == doc]
        scored = [i for w in mine for i in w.scored]
        first = 0 if prefix else 1
        assert scored == list(range(first, n)), "each target once, in order"
        tokens = list(range(n))
        for w in mine:
            inputs, targets = w.inputs(tokens), w.targets(tokens)
            assert 1 <= w.n_inputs == len(inputs) == len(targets) <= max_length
            assert 1 <= w.n_scored <= len(targets)
            # each target is the token right after its input; after the prefix comes tokens[start]
            if inputs[0] == P:
                assert targets[0] == w.start
            assert all(t == x + 1 for x, t in zip(inputs, targets) if x != P)
        if plan == "lm-eval" and not every_window:  # later windows get max_length tokens of context
            assert all(w.n_inputs == max_length for w in mine[1:])
        if plan == "sliding" and not prefix and stride < max_length:  # the HF guide's starts
            assert [w.start for w in mine] == [k * stride for k in range(len(mine))]


def test_window_is_plain_data():
    w = Window(doc=2, start=3, stop=7, n_scored=2)
    assert (w.n_inputs, list(w.scored), w.min_context) == (4, [6, 7], 3)


def test_chunks_golden_llama_cpp_and_gptq():
    # llama-perplexity -c 4 over 11 tokens: chunks [0..3], [4..7], the remainder 8..10 dropped; BOS
    # (P) over each chunk's first token; first = 4 // 2 = 2, so it scores 4 - 2 - 1 = 1 per chunk:
    # the logit at chunk position 2 predicting position 3.
    got = _pairs(plan_windows([11], plan="chunks", max_length=4, score_from=2, prefix_id=P), 11)
    assert got == [([P, 1, 2], [3]), ([P, 5, 6], [7])]
    # GPTQ's loop: every chunk's 3 predictions, nothing written over its first token.
    assert _pairs(plan_windows([11], plan="chunks", max_length=4), 11) == [([0, 1, 2], [1, 2, 3]),
                                                                            ([4, 5, 6], [5, 6, 7])]
    # --chunks counts over all documents, in order; a document shorter than a chunk has none.
    windows = plan_windows([3, 9, 8], plan="chunks", max_length=4, max_chunks=3)
    assert [(w.doc, w.start) for w in windows] == [(1, 0), (1, 4), (2, 0)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_length=1), "max_length >= 2"),
    (dict(max_length=4, score_from=3), r"score_from must be an int in \[0, max_length - 2 = 2\]"),
    (dict(max_length=4, max_chunks=0), "max_chunks must be a positive int"),
    (dict(max_length=4, prefix_id=P, every_window=True), "every_window is for the other plans"),
])
def test_chunks_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_windows([10], plan="chunks", **kwargs)
    with pytest.raises(ValueError, match="for plan='chunks'"):
        plan_windows([10], plan="lm-eval", max_length=4, prefix_id=P, score_from=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=5), st.integers(2, 9), st.data())
def test_chunks_score_each_target_at_most_once_within_its_chunk(lengths, max_length, data):
    score_from = data.draw(st.integers(0, max_length - 2))
    bos = data.draw(st.sampled_from([None, P]))
    windows = plan_windows(lengths, plan="chunks", max_length=max_length, score_from=score_from, prefix_id=bos)
    assert len(windows) == sum(n // max_length for n in lengths)
    for w in windows:
        k = w.start // max_length
        assert w.n_inputs == max_length - 1 and w.n_scored == max_length - 1 - score_from
        assert list(w.scored) == list(range(k * max_length + score_from + 1, (k + 1) * max_length))
        assert w.min_context == score_from + 1
