"""token_stats and linear_token_stats against a float64 reference written here, independent of lmloss.

The Triton kernel runs here under TRITON_INTERPRET=1 at small sizes, in a subprocess (the variable
must be set before triton is imported); on a CUDA machine it runs natively.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lmloss.ops.linear_stats import linear_token_stats
from lmloss.ops.stats import STATS_IMPLS, TokenStats, token_stats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IMPLS = [name for name in STATS_IMPLS if name != "triton" or INTERPRET or CUDA]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETER_MAX_ELEMENTS = 200_000
EPS32 = torch.finfo(torch.float32).eps


def _skip_if_too_big(impl, n_elements):
    if impl == "triton" and INTERPRET and n_elements > INTERPRETER_MAX_ELEMENTS:
        pytest.skip("too large for the Triton interpreter")


# ---- float64 reference, independent of lmloss ------------------------------------------------------

def stats_float64(logits, targets, ignore_index=-100):
    """(nll, entropy, rank, argmax) from F.log_softmax of the float64 logits; nll 0 and rank -1 where ignored."""
    V = logits.shape[-1]
    z = logits.detach().double().reshape(-1, V).cpu()
    t = targets.reshape(-1).cpu()
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)[:, None]
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    nll = torch.where(valid, -logp.gather(1, tc)[:, 0], 0.0)
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    rank = torch.where(valid, (z > z.gather(1, tc)).sum(-1), -1)
    return [x.reshape(targets.shape) for x in (nll, entropy, rank, z.argmax(-1))]


def assert_matches(got, logits, targets, ignore_index=-100, rtol=8 * EPS32):
    """nll and entropy within a few float32 ulps of float64 (relative to 1 + the value); rank and
    argmax exactly: they only compare logits, which the upcast to float32 keeps exact."""
    nll, entropy, rank, argmax = stats_float64(logits, targets, ignore_index)
    assert isinstance(got, TokenStats)
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert got.nll.dtype == got.entropy.dtype == cdt and got.rank.dtype == got.argmax.dtype == torch.int64
    assert all(x.shape == targets.shape and x.device == logits.device for x in got)
    for name, mine, ref in (("nll", got.nll, nll), ("entropy", got.entropy, entropy)):
        err = (mine.cpu().double() - ref).abs()
        assert (err <= rtol * (1 + ref.abs())).all(), f"{name}: max err {err.max():.3g}"
    assert torch.equal(got.rank.cpu(), rank), (got.rank.cpu() - rank).abs().max()
    assert torch.equal(got.argmax.cpu(), argmax)
    assert (got.nll[targets == ignore_index] == 0).all()


def make(N, V, scale, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[::5] = -100
    return logits, targets


# ---- token_stats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 5003), (37, 50257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64(impl, shape, dtype, scale):
    _skip_if_too_big(impl, shape[0] * shape[1])
    logits, targets = make(*shape, scale, dtype, seed=shape[0] * shape[1])
    before, t_before = logits.clone(), targets.clone()
    got = token_stats(logits, targets, impl=impl)
    assert_matches(got, logits, targets)
    assert torch.equal(logits, before) and torch.equal(targets, t_before)  # inputs never written


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_logits_give_float64(impl):
    logits, targets = make(9, 301, 10.0, torch.float64)
    assert_matches(token_stats(logits, targets, impl=impl), logits, targets, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_leading_shapes(impl, dtype):
    B, T, V = 2, 6, 1000
    logits, _ = make(B * T, V, 10.0, dtype)
    logits = logits.view(B, T, V)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    ids[0, 3] = -100
    shifted, next_ids = logits[:, :-1], ids[:, 1:]  # (2, 5, 1000), not viewable as (10, 1000)
    assert not shifted.is_contiguous()
    assert_matches(token_stats(shifted, next_ids, impl=impl), shifted, next_ids)
    transposed = make(V, 5, 10.0, dtype)[0].t()  # (5, V) with column stride 5
    assert_matches(token_stats(transposed, next_ids[1], impl=impl), transposed, next_ids[1])
    one = token_stats(logits[0, 0], ids[0, 0], impl=impl)  # (V,) logits, 0-d target
    assert all(x.shape == () for x in one)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_rank_strict_argmax_first(impl):
    V = 3000  # more than one Triton block and one argmax chunk
    logits = torch.zeros(6, V, device=DEVICE)
    logits[0, [5, 2500, 2999]] = 7.0  # the max three times, target at 2500: rank 0, argmax 5
    logits[1, [100, 200, 300]] = 3.0  # target ties two others: rank counts only the strictly larger
    logits[1, 2900] = 4.0
    logits[2, 2999] = 1.0  # max in the last column
    logits[3, 1] = float("-inf")  # uniform but one: target 0 ties everything but the -inf
    logits[4] = 2.0  # uniform: entropy = ln V, every rank 0, argmax 0
    logits[5] = float("-inf")  # one logit left: a masked first Triton block, entropy 0
    logits[5, 2048] = 5.0
    targets = torch.tensor([2500, 200, 0, 0, 17, 2048], device=DEVICE)
    got = token_stats(logits, targets, impl=impl)
    assert got.rank.tolist() == [0, 1, 1, 0, 0, 0]
    assert got.argmax.tolist() == [5, 2900, 2999, 0, 0, 2048]
    assert got.entropy[4].item() == pytest.approx(math.log(V), rel=1e-6)
    assert got.nll[4].item() == pytest.approx(math.log(V), rel=1e-6)
    assert got.entropy[5].item() == pytest.approx(0.0, abs=1e-6)
    assert_matches(got, logits, targets)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_magnitude_logits_keep_entropy_precise(impl):
    # lse - E_p[z] taken literally would err by ulp(2e4) = 2e-3 nats; d = z - m keeps float32's precision
    logits, targets = make(7, 2001, 3.0, torch.float32)
    for offset in (2e4, -2e4):
        shifted = logits + offset
        got = token_stats(shifted, targets, impl=impl)
        ref = stats_float64(shifted, targets)
        torch.testing.assert_close(got.entropy.cpu().double(), ref[1], rtol=0, atol=1e-5)
        assert torch.equal(got.rank.cpu(), ref[2]) and torch.equal(got.argmax.cpu(), ref[3])
    peaked = torch.full((2, 300), -80.0, device=DEVICE)  # entropy ~ 300 * 80 * exp(-80): tiny, positive
    peaked[:, 7] = 0.0
    got = token_stats(peaked, torch.tensor([7, 8], device=DEVICE), impl=impl)
    assert (got.entropy >= 0).all() and (got.entropy < 1e-30).all()
    assert got.rank.tolist() == [0, 1] and got.nll[1].item() == pytest.approx(80.0, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_ignore_index(impl, ignore_index):
    logits, _ = make(40, 11, 3.0, torch.float32)
    targets = torch.randint(0, 11, (40,), device=DEVICE)
    targets[::3] = ignore_index
    got = token_stats(logits, targets, ignore_index=ignore_index, impl=impl)
    assert_matches(got, logits, targets, ignore_index)
    ignored = targets == ignore_index
    assert (got.rank[ignored] == -1).all() and (got.nll[ignored] == 0).all()
    # entropy and argmax do not depend on the target: the same as with every target kept
    everything = token_stats(logits, torch.zeros_like(targets), ignore_index=ignore_index + 1000, impl=impl)
    assert torch.equal(got.entropy, everything.entropy) and torch.equal(got.argmax, everything.argmax)
    all_ignored = token_stats(logits, torch.full_like(targets, -100), impl=impl)
    assert (all_ignored.nll == 0).all() and (all_ignored.rank == -1).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy's inf - inf, in the interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_rows_give_nan_like_token_nll(impl):
    logits, _ = make(4, 300, 1.0, torch.float32)
    logits[1, 17] = float("nan")
    logits[2, 5] = float("inf")
    got = token_stats(logits, torch.tensor([3, 4, 5, 6], device=DEVICE), impl=impl)
    assert torch.isfinite(got.nll[[0, 3]]).all() and torch.isfinite(got.entropy[[0, 3]]).all()
    assert torch.isnan(got.nll[[1, 2]]).all() and torch.isnan(got.entropy[[1, 2]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad(impl):
    logits = make(3, 50, 1.0, torch.float32)[0].requires_grad_()
    got = token_stats(logits, torch.tensor([0, 1, 2], device=DEVICE), impl=impl)
    assert not any(x.requires_grad for x in got)


@pytest.mark.parametrize("logits, targets, error, match", [
    (torch.randn(4, 10), torch.zeros(5, dtype=torch.long), ValueError, "targets shape"),
    (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long), TypeError, "logits must be float32"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int32), TypeError, "int64"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), ValueError, "V >= 1"),
    (torch.randn(2, 5), torch.tensor([0, 5]), ValueError, r"targets\[1\] = 5 is outside the vocabulary"),
    (torch.randn(2, 5), torch.tensor([-1, 0]), ValueError, r"targets\[0\] = -1"),
])
def test_bad_inputs(logits, targets, error, match):
    with pytest.raises(error, match=match):
        token_stats(logits, targets)


def test_bad_impl_and_triton_on_cpu():
    logits, targets = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        token_stats(logits, targets, impl="fast")
    if not (INTERPRET or CUDA):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            token_stats(logits, targets, impl="triton")


def test_chunked_under_inference_mode():
    logits, targets = make(600, 503, 10.0, torch.float32)  # several row ranges on the worker threads
    with torch.inference_mode():
        got = token_stats(logits, targets, impl="chunked")
    assert_matches(got, logits, targets)


# ---- linear_token_stats ----------------------------------------------------------------------------

def make_linear(N, d, V, *, dtype=torch.float32, scale=10.0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * (scale / math.sqrt(d))).to(dtype)
    b = (torch.randn(V, generator=g) * scale).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    return hidden, weight, b, targets


def logits_float64(hidden, weight, bias, softcap):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def assert_linear_matches(got, z64, targets, tol):
    """Against float64 logits: nll/entropy within tol; rank and argmax exact up to float32 near-ties
    (logits within tol of the target's, or of the max, may fall either way)."""
    nll, entropy, rank, argmax = stats_float64(z64, targets)
    torch.testing.assert_close(got.nll.double(), nll, rtol=0, atol=tol)
    torch.testing.assert_close(got.entropy.double(), entropy, rtol=0, atol=tol)
    z = z64.reshape(-1, z64.shape[-1])
    t = targets.reshape(-1)
    valid = t != -100
    z_t = z.gather(1, torch.where(valid, t, 0)[:, None])
    lo = torch.where(valid, (z > z_t + tol).sum(-1), -1)
    hi = torch.where(valid, (z > z_t - tol).sum(-1) - 1, -1)  # minus the target itself
    r = got.rank.reshape(-1)
    assert ((lo <= r) & (r <= hi)).all()
    assert (rank.reshape(-1) == r).float().mean() > 0.9
    a = got.argmax.reshape(-1)
    assert (z.gather(1, a[:, None])[:, 0] >= z.amax(-1) - tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("N,d,V,chunk_size", [(37, 64, 50257, None), (1, 16, 7, None), (5, 96, 3001, 1000),
                                               (300, 32, 5003, 100)])
def test_linear_matches_float64(N, d, V, chunk_size, dtype, bias, softcap):
    hidden, weight, b, targets = make_linear(N, d, V, dtype=dtype, bias=bias)
    before = [x.clone() for x in (hidden, weight, targets)]
    got = linear_token_stats(hidden, weight, targets, bias=b, softcap=softcap, chunk_size=chunk_size)
    assert all(torch.equal(x, y) for x, y in zip((hidden, weight, targets), before))
    assert got.nll.dtype == torch.float32 and got.rank.dtype == torch.int64 and got.nll.shape == (N,)
    assert_linear_matches(got, logits_float64(hidden, weight, b, softcap), targets, tol=2e-4)


def test_linear_equals_token_stats_of_its_logits_and_leading_shape():
    hidden, weight, b, _ = make_linear(2 * 9, 48, 4001, bias=True)
    h3 = hidden.view(2, 9, 48)[:, :-1]  # (2, 8, 48), non-contiguous
    targets = torch.randint(0, 4001, (2, 8))
    targets[1, 2] = -100
    got = linear_token_stats(h3, weight, targets, bias=b, chunk_size=512)
    assert all(x.shape == (2, 8) for x in got)
    z = logits_float64(h3, weight, b, None)
    assert_linear_matches(got, z, targets, tol=2e-4)
    from_logits = token_stats((h3 @ weight.T + b), targets)  # float32 logits, one matmul
    torch.testing.assert_close(got.nll, from_logits.nll, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.entropy, from_logits.entropy, rtol=0, atol=1e-4)


def test_linear_ties_in_logits():
    """Duplicate rows of W give exactly tied logits, in different vocabulary blocks and in the narrow
    last block: ties with the target do not count, the argmax is the first of the tied maxima."""
    hidden, weight, _, _ = make_linear(6, 32, 1100, scale=1.0)
    weight[[3, 600, 1099]] = hidden[0] * 4  # the row-0 max, three times: the last block is 1100 - 1024 wide
    weight[[10, 700]] = weight[20].clone()
    hidden[[2, 5]] = hidden[1].clone()  # three rows with the same logits, scored on three tied targets
    targets = torch.tensor([600, 700, 10, 1099, -100, 20])
    got = linear_token_stats(hidden, weight, targets, chunk_size=512)
    z = hidden @ weight.T
    assert got.argmax[0].item() == 3 and got.rank[0].item() == 0
    for i in range(6):
        if targets[i] >= 0:
            z_t = z[i, targets[i]]
            # ties of the target in float32 may round differently in another matmul; allow those
            lo, hi = (z[i] > z_t + 1e-4).sum().item(), (z[i] > z_t - 1e-4).sum().item() - 1
            assert lo <= got.rank[i].item() <= hi
    assert got.rank[1].item() == got.rank[2].item() == got.rank[5].item()  # three tied targets, one rank


def test_linear_rank_falls_back_when_the_target_logit_disagrees(monkeypatch):
    """The rank is recomputed from the rows' own logits where the precomputed target logit is not the
    tile's entry (here forced by perturbing it): the result is still exact."""
    import lmloss.ops.linear_stats as ls
    hidden, weight, b, targets = make_linear(23, 16, 3001, bias=True)
    exact = linear_token_stats(hidden, weight, targets, bias=b, chunk_size=1000)
    real = ls._target_logits
    monkeypatch.setattr(ls, "_target_logits", lambda *a: real(*a) + 0.5)  # every row disagrees
    got = linear_token_stats(hidden, weight, targets, bias=b, chunk_size=1000)
    assert torch.equal(got.rank, exact.rank) and torch.equal(got.argmax, exact.argmax)
    torch.testing.assert_close(got.nll, exact.nll, rtol=0, atol=0)


def test_linear_bad_inputs():
    hidden, weight, _, targets = make_linear(4, 8, 10)
    with pytest.raises(ValueError, match="share d"):
        linear_token_stats(hidden[:, :5], weight, targets)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        linear_token_stats(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="softcap"):
        linear_token_stats(hidden, weight, targets, softcap=-1.0)


# ---- Triton, natively on CUDA or in the interpreter -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(INTERPRET or CUDA, reason="already running the triton cases directly")
def test_triton_kernel_in_interpreter(triton_interpreter):
    triton_interpreter(__file__, "-W", "ignore::RuntimeWarning")


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="the launcher needs CUDA or TRITON_INTERPRET=1")
def test_triton_launcher_takes_the_config_as_data():
    from lmloss.ops.stats_triton import token_stats_rows
    logits, targets = make(5, 300, 10.0, torch.float32)
    ref = stats_float64(logits, targets)
    for config in (None, (64, 4), (128, 2)):
        nll, entropy, rank, argmax = token_stats_rows(logits, targets, -100, config=config)
        torch.testing.assert_close(entropy.cpu().double(), ref[1], rtol=1e-6, atol=1e-6)
        assert torch.equal(argmax.cpu(), ref[3])
        valid = (targets != -100).cpu()
        assert torch.equal(rank.cpu()[valid], ref[2][valid])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_gpt2_batch_on_cuda(dtype):
    N, V = 4096, 50257
    logits, targets = make(N, V, 10.0, dtype)
    before = logits.clone()
    got = token_stats(logits, targets, impl="triton")
    assert torch.equal(logits, before)
    rows = torch.arange(0, N, 37, device=DEVICE)
    assert_matches(TokenStats(*(x[rows] for x in got)), logits[rows], targets[rows])
    chunked = token_stats(logits, targets, impl="chunked")  # torch ops on the GPU: same ranks and argmax
    assert torch.equal(got.rank, chunked.rank) and torch.equal(got.argmax, chunked.argmax)
    torch.testing.assert_close(got.entropy, chunked.entropy, rtol=1e-5, atol=1e-5)
