"""lmloss.ops against float64 references written here, independently of the code under test.

Accuracy follows Cut Cross-Entropy's rule: an implementation's error against float64 is no worse than
F.cross_entropy's in the same dtype, plus a small tolerance. The Triton kernels run here under
TRITON_INTERPRET=1 at small sizes, in a subprocess (the variable must be set before triton is
imported); on a CUDA machine they run natively.
"""

import functools
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lmloss
from lmloss import cross_entropy, logsumexp, token_nll
from lmloss.ops import native

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALES = [1.0, 10.0, 30.0]
# Odd shapes: N=423 rows of GPT-2's vocabulary, V=1 and V=3, and the other vocabularies of the issue.
SHAPES = [(423, 50257), (17, 3), (64, 1), (5, 32000), (3, 128256), (2, 262144)]
INTERPRETER_MAX_ELEMENTS = 200_000  # the interpreter runs each program in numpy: keep it small


# Triton runs natively on CUDA; on CPU only in the interpreter, i.e. in test_triton_kernels_in_interpreter's
# subprocess, which runs this file's "triton" cases with TRITON_INTERPRET=1.
IMPLS = [name for name in lmloss.IMPLS if (name != "triton" or INTERPRET or CUDA)
         and (name != "native" or native.available())]  # test_native.py fails where a compiler is there but no build


def _skip_if_too_big(impl, n_elements):
    if impl == "triton" and INTERPRET and n_elements > INTERPRETER_MAX_ELEMENTS:
        pytest.skip("too large for the Triton interpreter")


# ---- float64 references, independent of lmloss -------------------------------------------------------

def nll_float64(logits, targets, ignore_index=-100):
    """-log softmax(x)[t] in float64, max-shifted; 0 where ignored. logits (..., V) -> (...)."""
    V = logits.shape[-1]
    x = logits.detach().double().reshape(-1, V)
    t = targets.reshape(-1)
    m = x.max(dim=1, keepdim=True).values
    lse = (m + (x - m).exp().sum(dim=1, keepdim=True).log())[:, 0]
    valid = t != ignore_index
    x_t = x.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return torch.where(valid, lse - x_t, 0.0).reshape(targets.shape)


def grad_float64(logits, targets, grad_nll, ignore_index=-100):
    """d(sum(nll * grad_nll)) / d logits = (softmax - onehot) * grad_nll, float64."""
    V = logits.shape[-1]
    x = logits.detach().double().reshape(-1, V)
    t = targets.reshape(-1)
    g = torch.where(t != ignore_index, grad_nll.reshape(-1).double().to(x.device), 0.0)[:, None]
    p = torch.softmax(x, dim=1)
    onehot = torch.zeros_like(p)
    valid = (t != ignore_index).nonzero()[:, 0]
    onehot[valid, t[valid]] = 1.0
    return ((p - onehot) * g).reshape(logits.shape)


def make_logits(N, V, scale, dtype, device=DEVICE):
    return (torch.randn(N, V, device=device) * scale).to(dtype)


def make_targets(N, V, n_ignored=0, device=DEVICE):
    t = torch.randint(0, V, (N,), device=device)
    t[torch.randperm(N, device=device)[:n_ignored]] = -100
    return t


# ---- forward accuracy ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)  # the impls of one case run back to back: build its reference once
def _forward_case(shape, dtype, scale):
    N, V = shape
    gen = torch.Generator().manual_seed(N * V + int(scale))
    logits = (torch.randn(N, V, generator=gen) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    targets[::7] = -100
    ref = nll_float64(logits, targets)
    err_torch = (F.cross_entropy(logits, targets, reduction="none").double() - ref).abs()  # torch in `dtype`
    # tol: a few float32 ulps of the row's largest term (lse and x_t are that large)
    tol = 4 * torch.finfo(torch.float32).eps * (1.0 + ref.abs() + logits.double().abs().amax(dim=1))
    return logits, targets, ref, err_torch + tol


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_nll_no_worse_than_torch(impl, shape, dtype, scale):
    _skip_if_too_big(impl, shape[0] * shape[1])
    logits, targets, ref, allowed_err = _forward_case(shape, dtype, scale)
    got = token_nll(logits, targets, impl=impl)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    err = (got.double() - ref).abs()
    assert (err <= allowed_err).all(), f"max err {err.max():.3g}, allowed {allowed_err.min():.3g}.."  # CCE's rule
    assert (got[targets == -100] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logsumexp_matches_float64(impl, dtype):
    logits = make_logits(37, 5003, 30.0, dtype)
    logits[3, 0] = float("-inf")  # a masked first column must not disturb the row's lse
    logits[4, :4096] = float("-inf")  # nor a masked first vocabulary block
    got = logsumexp(logits, impl=impl)
    ref = torch.logsumexp(logits.double(), dim=-1)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double(), ref, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_logits_give_ln_V(impl):
    V = 50257
    N = 3 if impl == "triton" and INTERPRET else 64
    logits = torch.full((N, V), 1.7, device=DEVICE)
    targets = make_targets(N, V)
    nll = token_nll(logits, targets, impl=impl)
    torch.testing.assert_close(nll.double().cpu(), torch.full((N,), math.log(V), dtype=torch.float64),
                               rtol=1e-6, atol=0)  # ln 50257 = 10.8249...
    assert lmloss.perplexity(nll.sum(), N) == pytest.approx(V, rel=1e-5)


# ---- ignore_index, shapes, strides, inputs ------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    logits = make_logits(6, 101, 10.0, torch.float32).requires_grad_()
    targets = torch.full((6,), -100, device=DEVICE)
    assert torch.equal(token_nll(logits, targets, impl=impl), torch.zeros(6, device=DEVICE))
    assert cross_entropy(logits, targets, reduction="sum", impl=impl).item() == 0.0
    mean = cross_entropy(logits, targets, impl=impl)
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(logits, targets))  # 0 / 0, like torch
    cross_entropy(logits, targets, reduction="sum", impl=impl).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_custom_ignore_index(impl, ignore_index):
    logits = make_logits(40, 11, 3.0, torch.float32).requires_grad_()
    targets = torch.randint(0, 11, (40,), device=DEVICE)
    targets[::3] = ignore_index
    got = cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none", impl=impl)
    torch.testing.assert_close(got.double(), nll_float64(logits, targets, ignore_index), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    ref = grad_float64(logits, targets, torch.ones(40), ignore_index)
    torch.testing.assert_close(logits.grad.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_row_and_leading_shapes(impl):
    logits = make_logits(1, 1000, 10.0, torch.float32)
    targets = torch.tensor([999], device=DEVICE)
    torch.testing.assert_close(token_nll(logits, targets, impl=impl).double(), nll_float64(logits, targets))
    # (V,) logits with a 0-d target, and (B, T, V) with (B, T)
    assert token_nll(logits[0], targets[0], impl=impl).shape == ()
    logits3 = make_logits(6, 1000, 10.0, torch.float32).view(2, 3, 1000)
    targets3 = make_targets(6, 1000).view(2, 3)
    got = token_nll(logits3, targets3, impl=impl)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), nll_float64(logits3, targets3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_next_token_slice_and_inputs_unchanged(impl, dtype):
    B, T, V = 3, 9, 1003
    logits = make_logits(B * T, V, 10.0, dtype).view(B, T, V)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    ids[0, 4] = -100
    shifted, next_ids = logits[:, :-1], ids[:, 1:]  # not viewable as (B*(T-1), V)
    assert not shifted.is_contiguous()
    before, ids_before = logits.clone(), ids.clone()
    leaf = shifted.detach().requires_grad_()
    nll = token_nll(leaf, next_ids, impl=impl)
    torch.testing.assert_close(nll.double(), nll_float64(shifted, next_ids), rtol=1e-6, atol=1e-5)
    nll.sum().backward()
    grad_ref = grad_float64(shifted, next_ids, torch.ones(B, T - 1))
    rtol = max(2 * torch.finfo(dtype).eps, 1e-5)  # float32: exp(x - lse) with lse rounded to float32
    torch.testing.assert_close(leaf.grad.double(), grad_ref, rtol=rtol, atol=1e-6)
    assert torch.equal(logits, before) and torch.equal(ids, ids_before)
    assert torch.equal(leaf.detach(), shifted)
    # a transposed (non unit-stride) vocabulary dim works too
    logits_t = make_logits(V, 5, 10.0, dtype).t()
    torch.testing.assert_close(token_nll(logits_t, next_ids[0, :5], impl=impl).double(),
                               nll_float64(logits_t, next_ids[0, :5]), rtol=1e-6, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy's inf - inf, in the interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_row_gives_nan_token(impl):
    logits = make_logits(4, 300, 1.0, torch.float32)
    logits[1, 17] = float("nan")
    logits[2, 5] = float("inf")
    nll = token_nll(logits, torch.tensor([3, 4, 5, 6], device=DEVICE), impl=impl)
    assert torch.isfinite(nll[[0, 3]]).all() and torch.isnan(nll[[1, 2]]).all()
    with pytest.raises(ValueError, match="non-finite"):
        lmloss.LossTotals.from_nll(nll, where="test batch")


# ---- backward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    logits = torch.randn(6, 13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 5, 5, 3], device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: token_nll(x, targets, impl=impl), (logits,))
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets, impl=impl), (logits,))
    assert torch.autograd.gradcheck(lambda x: logsumexp(x, impl=impl), (logits,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_no_worse_than_torch(impl, dtype, scale, reduction):
    N, V = (7, 5003) if impl == "triton" and INTERPRET else (97, 5003)
    logits = make_logits(N, V, scale, dtype)
    targets = make_targets(N, V, n_ignored=5)
    grad_out = torch.rand(N, device=DEVICE) if reduction == "none" else torch.tensor(1.0, device=DEVICE)
    mine, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = cross_entropy(mine, targets, reduction=reduction, impl=impl)
    loss.backward(grad_out)
    F.cross_entropy(theirs, targets, reduction=reduction).backward(grad_out)
    assert mine.grad.dtype == dtype
    n_valid = (targets != -100).sum()
    g = grad_out.expand(N) / (n_valid if reduction == "mean" else 1)
    ref = grad_float64(logits, targets, g)
    loss_ref = F.cross_entropy(logits.double(), targets, reduction=reduction)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    err = (mine.grad.double() - ref).abs()
    err_torch = (theirs.grad.double() - ref).abs()
    fi = torch.finfo(dtype)
    tol = fi.eps * ref.abs() + fi.eps * fi.tiny + 4 * torch.finfo(torch.float32).eps * g.abs().max()
    assert (err <= err_torch + tol).all(), f"max err {err.max():.3g} vs torch {err_torch.max():.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_gradient(impl):
    logits = make_logits(9, 777, 10.0, torch.float32).requires_grad_()
    (logsumexp(logits, impl=impl) ** 2).mean().backward()
    x64 = logits.detach().double().requires_grad_()
    (torch.logsumexp(x64, dim=-1) ** 2).mean().backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-5, atol=1e-8)


def test_training_step_matches_torch():
    torch.manual_seed(1)
    model = torch.nn.Linear(16, 101)
    twin = torch.nn.Linear(16, 101)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 16), torch.randint(0, 101, (32,))
    y[:4] = -100
    for m, loss_fn in ((model, cross_entropy), (twin, F.cross_entropy)):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()
    torch.testing.assert_close(model.weight, twin.weight, rtol=1e-5, atol=1e-6)


# ---- memory ------------------------------------------------------------------------------------------

class _LargestAllocation(TorchDispatchMode):
    """Records the largest fresh storage any op returns; views and out= writes share an input's storage."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.max_bytes = max(self.max_bytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_forward_extra_memory_under_one_percent(dtype):
    logits = make_logits(64, 50257, 3.0, dtype, device="cpu").repeat(32, 1)  # (2048, V), 206 MB in fp32
    targets = make_targets(2048, 50257, device="cpu")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dispatch modes are per thread: keep the block loop on this one
    try:
        with _LargestAllocation() as mode:
            token_nll(logits, targets, impl="chunked")
    finally:
        torch.set_num_threads(n_threads)
    assert mode.max_bytes < 0.01 * logits.untyped_storage().nbytes()


# ---- errors ------------------------------------------------------------------------------------------

def test_target_out_of_range_names_index_and_value():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 1, 2], [3, 5, -100]])
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = 5 is outside the vocabulary \[0, 5\)"):
        token_nll(logits, targets)
    targets[1, 1] = -1
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = -1"):
        cross_entropy(logits, targets)


@pytest.mark.parametrize("logits, targets, error, match", [
    (torch.randn(4, 10), torch.zeros(5, dtype=torch.long), ValueError, "targets shape"),
    (torch.randn(4, 10), torch.zeros(4, 1, dtype=torch.long), ValueError, "targets shape"),
    (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long), TypeError, "logits must be float32"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int32), TypeError, "int64"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), ValueError, "V >= 1"),
    ([[0.1, 0.2]], torch.zeros(1, dtype=torch.long), TypeError, "torch.Tensor"),
])
def test_bad_inputs(logits, targets, error, match):
    with pytest.raises(error, match=match):
        token_nll(logits, targets)


def test_bad_options():
    logits, targets = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        token_nll(logits, targets, impl="fast")
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(TypeError, match="logits must be float32"):
        logsumexp(torch.ones(2, 3, dtype=torch.int64))
    if not (INTERPRET or CUDA):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            token_nll(logits, targets, impl="triton")


# ---- choosing the implementation ----------------------------------------------------------------------

def test_auto_rule_picks_triton_only_on_cuda_with_triton(monkeypatch):
    from lmloss.ops._checks import choose_impl
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects need no GPU
    monkeypatch.setattr("lmloss.ops._checks.triton_available", lambda: True)
    assert choose_impl("auto", cuda, lmloss.IMPLS) == "triton"
    monkeypatch.setattr("lmloss.ops.native.available", lambda: True)
    assert choose_impl("auto", cpu, lmloss.IMPLS) == "native"  # the C loops where they build
    monkeypatch.setattr("lmloss.ops.native.available", lambda: False)
    assert choose_impl("auto", cpu, lmloss.IMPLS) == "chunked"  # else eager torch
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    assert choose_impl("auto", cuda, lmloss.IMPLS) == "chunked"  # CUDA without Triton: the fallback
    assert choose_impl("reference", cuda, lmloss.IMPLS) == "reference"  # a named impl is taken as named
    with pytest.raises(ValueError, match="unknown impl 'fast'; expected 'auto' or one of"):
        choose_impl("fast", cpu, lmloss.IMPLS)


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="the launchers need CUDA or TRITON_INTERPRET=1")
def test_triton_launchers_take_the_tile_config_as_data():
    from lmloss.ops import triton_kernels as tk
    logits = make_logits(5, 300, 10.0, torch.float32)
    targets = make_targets(5, 300, n_ignored=1)
    ref = nll_float64(logits, targets)
    assert tk.default_config(300)[0] == 512
    g = (targets != -100).float()  # the dispatcher's backward zeroes ignored rows before the launcher
    for config in (None, (64, 4), (128, 2)):  # None: the default
        nll, lse = tk.nll_lse(logits, targets, -100, config=config)
        torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-5)
        grad = tk.grad_logits(logits, targets, lse, g, torch.empty_like(logits), config=config)
        torch.testing.assert_close(grad.double(), grad_float64(logits, targets, g), rtol=1e-5, atol=1e-7)


# ---- Triton, natively on CUDA or in the interpreter -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(INTERPRET or CUDA, reason="already running the triton cases directly")
def test_triton_kernels_in_interpreter(triton_interpreter):
    triton_interpreter(__file__)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_triton_int64_offsets_past_2_pow_31():
    N, V = 16400, 131072  # N * V = 2.15e9 > 2**31 elements of bf16 (4.3 GB)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    got = token_nll(logits, targets, impl="triton")
    rows = torch.tensor([0, N // 2, N - 1], device="cuda")
    torch.testing.assert_close(got[rows].double(), nll_float64(logits[rows], targets[rows]), rtol=1e-5, atol=1e-5)


def test_chunked_under_inference_mode_matches_torch():
    # regression: the worker threads of the chunked path must run in the caller's inference mode,
    # else they cannot write into buffers made inside it (found on Gemma's 262,144-class logits)
    x = torch.randn(600, 5003) * 10
    t = torch.randint(0, 5003, (600,))
    with torch.inference_mode():
        got = lmloss.token_nll(x, t, impl="chunked")
    ref = torch.nn.functional.cross_entropy(x.double(), t, reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_chunked_target_shift_and_its_fallback_rows():
    # the chunked forward shifts each row by its target logit; rows where another logit is more than
    # ~88 nats above it overflow that shift and are redone max-shifted: both kinds in one batch
    V = 5003
    logits = make_logits(6, V, 1.0, torch.float32, device="cpu")
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    logits[1, 7] = logits[1, 1] + 80.0  # fast path, 80 nats above the target
    logits[2, 7] = logits[2, 2] + 100.0  # fallback: 2^(100 log2 e) overflows float32
    logits[3] += 1e4  # a large common offset: the shift removes it
    logits[4, 4] = float("-inf")  # a masked target: nll = inf, as torch
    logits[5, 9] = float("-inf")  # a masked other column: exp2(-inf) = 0
    nll = token_nll(logits, targets, impl="chunked")
    ref = nll_float64(logits, targets)
    torch.testing.assert_close(nll[[0, 1, 2, 3, 5]].double(), ref[[0, 1, 2, 3, 5]], rtol=1e-6, atol=1e-5)
    assert nll[4] == float("inf") and torch.isinf(F.cross_entropy(logits[4:5], targets[4:5]))
    lse = logsumexp(logits[[0, 1, 2, 3, 5]], impl="chunked")  # shifted by column 0 instead of a target
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits[[0, 1, 2, 3, 5]].double(), dim=1),
                               rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)
