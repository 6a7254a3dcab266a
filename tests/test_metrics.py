"""LossTotals and the training-loop functions against hand-computed sums."""
import math

import pytest
import torch

from lmloss import LossTotals, bits_per_byte, perplexity


def test_closed_form_uniform():
    # uniform logits over V: every token costs ln V nats
    V, n_tokens, n_bytes = 50257, 1000, 4321
    t = LossTotals(n_tokens * math.log(V), n_tokens, n_bytes, 700, 4000)
    assert t.token_perplexity == pytest.approx(V, rel=1e-12)
    assert t.bits_per_byte == pytest.approx(n_tokens * math.log2(V) / n_bytes, rel=1e-12)
    assert t.byte_perplexity == pytest.approx(2 ** t.bits_per_byte, rel=1e-12)
    assert t.word_perplexity == pytest.approx(math.exp(n_tokens * math.log(V) / 700), rel=1e-12)


def test_sum_of_parts_is_not_mean_of_ratios():
    a = LossTotals(10.0, 2, 10, 1, 10)
    b = LossTotals(1.0, 8, 30, 3, 30)
    t = a + b
    assert t == LossTotals(11.0, 10, 40, 4, 40)
    assert t.token_perplexity == pytest.approx(math.exp(1.1))
    mean_of_ppl = (a.token_perplexity + b.token_perplexity) / 2
    assert abs(t.token_perplexity - mean_of_ppl) > 1  # the mistake lmloss never makes
    assert sum([a, b]) == t


def test_from_nll_float64_and_mask():
    nll = torch.full((3, 1000), 1e-4, dtype=torch.float32) + 100.0
    t = LossTotals.from_nll(nll, n_bytes=5)
    ref = nll.double().sum().item()
    assert t.nll_nats == ref and t.n_tokens == 3000
    mask = torch.zeros(3, 1000, dtype=torch.bool)
    mask[1, :7] = True
    assert LossTotals.from_nll(nll, mask=mask).n_tokens == 7


def test_non_finite_refused_with_location():
    nll = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match=r"document 4.*token 1"):
        LossTotals.from_nll(nll, where="document 4")
    with pytest.raises(ValueError, match="non-finite"):
        LossTotals(float("inf"), 1, 1)
    with pytest.raises(ValueError, match="non-finite"):
        bits_per_byte(torch.tensor(float("nan")), 3)


def test_zero_denominators_raise():
    with pytest.raises(ValueError, match="n_tokens"):
        LossTotals(0.0, 0, 5).token_perplexity
    with pytest.raises(ValueError, match="n_bytes"):
        LossTotals(1.0, 1, 0).bits_per_byte
    with pytest.raises(ValueError, match="n_bytes > 0"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="n_tokens > 0"):
        perplexity(1.0, 0)
    assert "bits_per_byte" not in LossTotals(1.0, 1, 0).metrics()


def test_training_loop_functions():
    nll = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float32)
    assert bits_per_byte(nll.sum(), 4) == pytest.approx(4.0 / (4 * math.log(2)))
    assert perplexity(nll.sum(), 3) == pytest.approx(math.exp(4.0 / 3))
    with pytest.raises(ValueError, match="summed total"):
        bits_per_byte(nll, 4)


def test_all_reduce_single_process_gloo(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        t = LossTotals(1.25, 3, 7, 2, 6)
        assert t.all_reduce() == t
    finally:
        dist.destroy_process_group()


def test_perplexity_past_float_range_is_inf_not_an_error():
    # found by hypothesis: a mean NLL of 710 nats overflows exp(); the honest float is inf
    t = LossTotals(710.0, 1, 1, 1, 1)
    assert t.token_perplexity == math.inf and perplexity(710.0, 1) == math.inf
    assert t.bits_per_byte == pytest.approx(710 / math.log(2))


def test_from_rows_sums_document_rows():
    rows = [dict(index=0, nll_nats=10.5, n_tokens=4, n_bytes=20, n_words=3, n_chars=19),
            dict(index=1, nll_nats=0.25, n_tokens=1, n_bytes=2, n_words=1, n_chars=2)]
    t = LossTotals.from_rows(rows)
    assert (t.nll_nats, t.n_tokens, t.n_bytes, t.n_words, t.n_chars) == (10.75, 5, 22, 4, 21)
    assert LossTotals.from_rows([]) == LossTotals()


# -- argument checks: counts are whole numbers, the NLL a finite non-negative real ---------------

@pytest.mark.parametrize("fn, name", [(bits_per_byte, "n_bytes"), (perplexity, "n_tokens")])
@pytest.mark.parametrize("count, exc, shown", [
    (2.9, ValueError, "2.9"),                      # int() used to truncate it to 2
    (float("nan"), ValueError, "nan"),             # int() used to raise its own ValueError
    (float("inf"), ValueError, "inf"),             # int() used to raise OverflowError
    (torch.tensor(2.5), ValueError, "2.5"),
    ("3", TypeError, "'3'"),
    (True, TypeError, "True"),
    (torch.tensor(True), TypeError, "bool"),
    (None, TypeError, "None"),
])
def test_counts_must_be_whole_numbers(fn, name, count, exc, shown):
    with pytest.raises(exc, match=rf"{name} must be .*whole.*got .*{shown}"):
        fn(10.0, count)


@pytest.mark.parametrize("fn", [bits_per_byte, perplexity])
@pytest.mark.parametrize("nll, exc, shown", [
    ("10", TypeError, "'10'"),
    (False, TypeError, "False"),
    (torch.tensor(True), TypeError, "bool"),
    (-1.0, ValueError, "-1.0"),
    (-1e-12, ValueError, "-1e-12"),
    (torch.tensor(-0.5), ValueError, "-0.5"),
])
def test_nll_must_be_a_non_negative_real(fn, nll, exc, shown):
    with pytest.raises(exc, match=rf"nll_nats .*got .*{shown}"):
        fn(nll, 3)


def test_valid_argument_forms_keep_their_meaning():
    import numpy as np

    want_bpb, want_ppl = 10.0 / (3 * math.log(2)), math.exp(10.0 / 3)
    for nll in (10.0, 10, torch.tensor(10.0), torch.tensor(10.0, dtype=torch.bfloat16), torch.tensor([10.0]),
                np.float64(10.0), np.array(10.0), torch.tensor(10, dtype=torch.int64)):
        for count in (3, 3.0, torch.tensor(3), torch.tensor(3.0), np.int64(3), np.array(3), np.float32(3.0)):
            assert bits_per_byte(nll, count) == want_bpb, (nll, count)
            assert perplexity(nll, count) == pytest.approx(want_ppl, rel=1e-15), (nll, count)
    assert bits_per_byte(0.0, 1) == 0.0 and perplexity(-0.0, 1) == 1.0  # -0.0 is not negative


@pytest.mark.parametrize("args, exc, match", [
    ((-1.0, 1, 1), ValueError, r"LossTotals\.nll_nats .*got -1\.0"),
    (("1", 1, 1), TypeError, r"LossTotals\.nll_nats .*got str '1'"),
    ((None, 1, 1), TypeError, r"LossTotals\.nll_nats .*got NoneType"),
    ((1.0, 2.5, 1), ValueError, r"LossTotals\.n_tokens must be .*whole.*got 2\.5"),
    ((1.0, 1, float("nan")), ValueError, r"LossTotals\.n_bytes must be .*whole.*got nan"),
    ((1.0, 1, 1, "2"), TypeError, r"LossTotals\.n_words must be .*got str '2'"),
    ((1.0, 1, 1, 1, True), TypeError, r"LossTotals\.n_chars must be .*got bool True"),
    ((1.0, -1, 1), ValueError, r"LossTotals\.n_tokens must be >= 0, got -1"),
])
def test_loss_totals_checks_its_fields(args, exc, match):
    with pytest.raises(exc, match=match):
        LossTotals(*args)


def test_loss_totals_stores_python_numbers():
    t = LossTotals(torch.tensor(2.5, dtype=torch.float64), 3.0, torch.tensor(4), 1, 2)
    assert t == LossTotals(2.5, 3, 4, 1, 2)
    assert [type(v) for v in t.to_dict().values()] == [float, int, int, int, int]
    with pytest.raises(ValueError, match=r"n_bytes must be .*whole.*got 2\.9"):
        LossTotals.from_nll(torch.ones(3), n_bytes=2.9)  # int() used to make it 2
