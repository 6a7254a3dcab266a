"""lmloss.ops.kl.token_kl against a float64 reference written here, independently of the code under test.

The reference's own error is about eps64 * |logit| (log_softmax rounds each log-probability), so a
result counts as right within rtol * kl + that. The Triton kernel runs here under TRITON_INTERPRET=1
at small sizes, in a subprocess (the variable must be set before triton is imported); on a CUDA
machine it runs natively.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lmloss.ops.kl import KL_IMPLS, KLTokens, token_kl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IMPLS = [name for name in KL_IMPLS if name != "triton" or INTERPRET or CUDA]
INTERPRETER_MAX_ELEMENTS = 60_000  # the interpreter runs each program in numpy: keep it small
RTOL = {"reference": 1e-6, "chunked": 1e-6, "triton": 2e-5}  # float32 outputs round at 6e-8

# numpy's inf - inf and log(0) in the interpreter's masked lanes
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:divide by zero")


def _skip_if_too_big(impl, n_elements):
    if impl == "triton" and INTERPRET and n_elements > INTERPRETER_MAX_ELEMENTS:
        pytest.skip("too large for the Triton interpreter")


# ---- float64 reference, independent of lmloss --------------------------------------------------------

def kl_float64(ref_logits, logits):
    """sum p_ref * (log p_ref - log p) in float64 over the last dim; p_ref = 0 adds 0."""
    lp_ref = F.log_softmax(ref_logits.detach().double(), dim=-1)
    lp = F.log_softmax(logits.detach().double(), dim=-1)
    p_ref = lp_ref.exp()
    return torch.where(p_ref > 0, p_ref * (lp_ref - lp), 0.0).sum(-1)


def nll_float64(logits, targets, ignore_index=-100):
    lp = F.log_softmax(logits.detach().double(), dim=-1)
    valid = targets != ignore_index
    return torch.where(valid, -lp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0], 0.0)


def reference_error(ref_logits, logits):
    """A bound on kl_float64's own rounding: a few eps64 of the largest logit of the row."""
    big = ref_logits.detach().double().abs().amax(-1) + logits.detach().double().abs().amax(-1)
    return 16 * torch.finfo(torch.float64).eps * (1.0 + big)


def assert_kl_close(got, ref_logits, logits, impl, rtol=None):
    want = kl_float64(ref_logits, logits)
    err = (got.double() - want).abs()
    allowed = (RTOL[impl] if rtol is None else rtol) * want + reference_error(ref_logits, logits)
    assert (err <= allowed).all(), f"max rel err {(err / want).max():.3g} (kl {want.min():.3g}..{want.max():.3g})"


# ---- against the float64 reference -------------------------------------------------------------------

CASES = {  # name: (shape, reference dtype, model dtype, logit scale, model noise), odd shapes
    "1x1": ((1, 1), torch.float32, torch.float32, 1.0, 1.0),
    "3x7": ((3, 7), torch.float32, torch.float32, 1.0, 1.0),
    "37x50257": ((37, 50257), torch.float32, torch.float32, 3.0, 0.3),
    "423x101-scale30": ((423, 101), torch.float32, torch.float32, 30.0, 3.0),
    "17x3001-fp32-vs-bf16": ((17, 3001), torch.float32, torch.bfloat16, 3.0, 0.0),
    "9x5003-bf16": ((9, 5003), torch.bfloat16, torch.bfloat16, 10.0, 1.0),
    "11x1000-fp16-vs-fp32": ((11, 1000), torch.float16, torch.float32, 3.0, 0.5),
    "6x13-fp64": ((6, 13), torch.float64, torch.float64, 3.0, 1.0),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(impl, case):
    shape, ref_dtype, dtype, scale, noise = CASES[case]
    _skip_if_too_big(impl, shape[0] * shape[1])
    gen = torch.Generator().manual_seed(shape[0] * shape[1])
    ref_logits = (torch.randn(shape, generator=gen) * scale).to(ref_dtype).to(DEVICE)
    # noise 0: the model is the reference rounded to its dtype (fp32 reference vs a bf16 model)
    logits = (ref_logits.float() + noise * torch.randn(shape, generator=gen).to(DEVICE)).to(dtype)
    targets = torch.randint(0, shape[1], shape[:1], generator=gen).to(DEVICE)
    targets[::5] = -100
    before = (ref_logits.clone(), logits.clone(), targets.clone())
    out = token_kl(ref_logits, logits, targets, impl=impl)
    assert isinstance(out, KLTokens)
    out_dtype = torch.float64 if torch.float64 in (ref_dtype, dtype) else torch.float32
    assert [f.dtype for f in out] == [out_dtype] * 3 + [torch.int64] * 2
    assert all(f.shape == shape[:1] for f in out)
    assert_kl_close(out.kl, ref_logits, logits, impl)
    assert (out.kl >= 0).all()
    for nll, x in ((out.nll_ref, ref_logits), (out.nll, logits)):  # a few float32 ulps of the largest term
        want = nll_float64(x, targets)
        tol = 4 * torch.finfo(torch.float32).eps * (1.0 + want.abs() + x.double().abs().amax(-1))
        assert ((nll.double() - want).abs() <= tol).all()
        assert (nll[targets == -100] == 0).all()
    assert torch.equal(out.argmax_ref, ref_logits.argmax(-1)) and torch.equal(out.argmax, logits.argmax(-1))
    assert all(torch.equal(a, b) for a, b in zip((ref_logits, logits, targets), before))  # inputs unchanged


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_non_contiguous(impl):
    B, T, V = 2, 6, 1000
    ref_logits = torch.randn(B, T, V, device=DEVICE) * 3  # contiguous
    model = (ref_logits + torch.randn(B, T, V, device=DEVICE)).to(torch.bfloat16)
    logits = torch.cat([model, model[:, :1]], dim=1)[:, :-1]  # (2, 6, V) slice: not viewable as (12, V)
    assert not logits.is_contiguous() and torch.equal(logits, model)
    ref_before, logits_before = ref_logits.clone(), logits.clone()
    targets = torch.randint(0, V, (B, T), device=DEVICE)
    out = token_kl(ref_logits, logits, targets, impl=impl)
    assert all(f.shape == (B, T) for f in out)
    assert_kl_close(out.kl, ref_logits, logits, impl)
    assert torch.equal(out.argmax, logits.argmax(-1))
    assert torch.equal(ref_logits, ref_before) and torch.equal(logits, logits_before)
    # a transposed (non unit-stride) vocabulary dim, and a single (V,) row with a 0-d target
    ref_t, logits_t = torch.randn(V, 5, device=DEVICE).t(), torch.randn(V, 5, device=DEVICE).t()
    assert_kl_close(token_kl(ref_t, logits_t, impl=impl).kl, ref_t, logits_t, impl)
    one = token_kl(ref_logits[0, 0], logits[0, 0], targets[0, 0], impl=impl)
    assert all(f.shape == () for f in one)
    assert one.kl.item() == pytest.approx(kl_float64(ref_logits[0, 0], logits[0, 0]).item(), rel=RTOL[impl])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows(impl):
    out = token_kl(torch.randn(0, 10, device=DEVICE), torch.randn(0, 10, device=DEVICE), impl=impl)
    assert all(f.shape == (0,) for f in out)


# ---- precision where the KL is tiny, huge, or the logits are large --------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_identical_inputs_give_zero(impl):
    logits = torch.randn(7, 3001, device=DEVICE) * 10
    logits[:, 5] = float("-inf")  # a masked column in both
    assert torch.equal(token_kl(logits, logits, impl=impl).kl, torch.zeros(7, device=DEVICE))
    model = logits.to(torch.bfloat16)  # the same values in two dtypes
    kl = token_kl(model.float(), model, impl=impl).kl
    assert (kl < 1e-7).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("noise", [1e-3, 1e-4])
def test_nearly_identical_relative_error(impl, scale, noise):
    """KL ~ noise^2 / 2: float32 a / s_r - lse_ref + lse keeps no digit here (checked below)."""
    N, V = (4, 5003) if impl == "triton" and INTERPRET else (64, 5003)
    gen = torch.Generator().manual_seed(int(scale))
    ref_logits = (torch.randn(N, V, generator=gen) * scale).to(DEVICE)
    logits = ref_logits + noise * torch.randn(N, V, generator=gen).to(DEVICE) + 2.5  # a shift changes nothing
    want = kl_float64(ref_logits, logits)
    assert want.max() < 4 * noise ** 2  # tiny KL indeed (float32 rounding of the logits adds a little)
    got = token_kl(ref_logits, logits, impl=impl).kl
    assert_kl_close(got, ref_logits, logits, impl, rtol=1e-4 if impl == "triton" else 1e-6)
    lp_ref, lp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)  # the float32 textbook formula
    torch_kl = F.kl_div(lp, lp_ref, log_target=True, reduction="none").sum(-1)
    assert ((torch_kl.double() - want).abs() / want).max() > 1e-2  # ... which this test would catch


@pytest.mark.parametrize("impl", IMPLS)
def test_very_different_distributions(impl):
    V = 3001
    gen = torch.Generator().manual_seed(3)
    peaked = (torch.randn(4, V, generator=gen) * 30).to(DEVICE)
    flat = (torch.randn(4, V, generator=gen) * 0.1).to(DEVICE)
    for ref_logits, logits in ((peaked, flat), (flat, peaked), (peaked, -peaked)):
        got = token_kl(ref_logits, logits, impl=impl).kl
        assert (got > 1).all()
        assert_kl_close(got, ref_logits, logits, impl)
    # closed form: a uniform model gives KL = ln V - H(P_ref)
    uniform = torch.full((4, V), -3.0, device=DEVICE)
    lp = F.log_softmax(peaked.double(), -1)
    entropy = -(lp.exp() * lp).sum(-1)
    got = token_kl(peaked, uniform, impl=impl).kl
    torch.testing.assert_close(got.double(), math.log(V) - entropy, rtol=RTOL[impl], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_token_closed_form(impl):
    # P_ref = (1/2, 1/2), P = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    ref_logits = torch.zeros(1, 2, device=DEVICE)
    logits = torch.tensor([[math.log(3.0), 0.0]], device=DEVICE)
    out = token_kl(ref_logits, logits, torch.tensor([1], device=DEVICE), impl=impl)
    assert out.kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert out.nll_ref.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.nll.item() == pytest.approx(math.log(4), rel=1e-6)
    assert out.argmax_ref.item() == 0 and out.argmax.item() == 0  # a tie: the first index


@pytest.mark.parametrize("impl", IMPLS)
def test_large_magnitude_logits(impl):
    V = 2000
    gen = torch.Generator().manual_seed(4)
    ref_logits = (1e4 + 3 * torch.randn(3, V, generator=gen)).to(DEVICE)  # near +1e4
    logits = (-1e4 + 3 * torch.randn(3, V, generator=gen)).to(DEVICE)  # near -1e4
    ref_logits[1, ::2] = -1e4  # half the vocabulary 2e4 below the rest
    logits[2] = torch.linspace(-1e4, 1e4, V)  # the whole range in one row
    out = token_kl(ref_logits, logits, torch.tensor([0, 7, V - 1], device=DEVICE), impl=impl)
    assert torch.isfinite(out.kl).all()
    assert_kl_close(out.kl, ref_logits, logits, impl)
    assert out.nll[2].item() == pytest.approx(0.0, abs=1e-3)  # the top logit is 10 above the next one


# ---- masked vocabulary, non-finite logits ----------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary(impl):
    V = 5003
    ref_logits = torch.randn(4, V, device=DEVICE) * 3
    logits = ref_logits + torch.randn(4, V, device=DEVICE)
    ref_logits[:, -3:] = logits[:, -3:] = float("-inf")  # padded vocabulary in both
    ref_logits[1, :4096] = logits[1, :4096] = float("-inf")  # a masked first block in both
    ref_logits[2, 10:20] = float("-inf")  # p_ref = 0 where the model has mass: adds 0
    got = token_kl(ref_logits, logits, impl=impl).kl
    assert torch.isfinite(got).all()
    assert_kl_close(got, ref_logits, logits, impl)
    logits[3, 100] = float("-inf")  # the model excludes a token the reference allows
    assert token_kl(ref_logits, logits, impl=impl).kl[3].item() == float("inf")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_rows_give_nan(impl):
    ref_logits = torch.randn(6, 300, device=DEVICE)
    logits = ref_logits + 0.1 * torch.randn(6, 300, device=DEVICE)
    ref_logits[1, 17] = float("nan")
    logits[2, 5] = float("nan")
    logits[3, 6] = float("inf")
    ref_logits[4] = float("-inf")  # no distribution at all
    out = token_kl(ref_logits, logits, torch.full((6,), 3, device=DEVICE), impl=impl)
    assert torch.isfinite(out.kl[[0, 5]]).all()
    assert torch.isnan(out.kl[1:5]).all()
    assert torch.isnan(out.nll_ref[1]) and torch.isnan(out.nll[2])


# ---- targets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_ignore_index_and_no_targets(impl, ignore_index):
    ref_logits = torch.randn(40, 11, device=DEVICE) * 3
    logits = torch.randn(40, 11, device=DEVICE) * 3
    targets = torch.randint(0, 11, (40,), device=DEVICE)
    targets[::3] = ignore_index
    out = token_kl(ref_logits, logits, targets, ignore_index=ignore_index, impl=impl)
    torch.testing.assert_close(out.nll.double(), nll_float64(logits, targets, ignore_index), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.nll_ref.double(), nll_float64(ref_logits, targets, ignore_index),
                               rtol=1e-6, atol=1e-6)
    no_targets = token_kl(ref_logits, logits, impl=impl)  # nll not computed: zeros
    assert torch.equal(no_targets.nll_ref, torch.zeros(40, device=DEVICE))
    assert torch.equal(no_targets.nll, torch.zeros(40, device=DEVICE))
    for a, b in ((out.kl, no_targets.kl), (out.argmax_ref, no_targets.argmax_ref), (out.argmax, no_targets.argmax)):
        assert torch.equal(a, b)


def test_not_differentiable():
    ref_logits = torch.randn(3, 10, requires_grad=True)
    logits = torch.randn(3, 10, requires_grad=True)
    out = token_kl(ref_logits, logits, impl="chunked")
    assert not any(f.requires_grad for f in out)


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref_logits, logits, targets, error, match", [
    (torch.randn(4, 10), torch.randn(5, 10), None, ValueError,
     r"ref_logits \(4, 10\) and logits \(5, 10\) must have the same shape"),
    (torch.randn(4, 10), torch.randn(4, 11), None, ValueError, "different vocabulary sizes.*share a vocabulary"),
    (torch.randn(2, 3, 10), torch.randn(6, 10), None, ValueError, "same shape"),
    (torch.randint(0, 5, (4, 10)), torch.randn(4, 10), None, TypeError, "ref_logits: logits must be float32"),
    (torch.randn(4, 10), torch.randn(4, 10).numpy(), None, TypeError, "logits: logits must be a torch.Tensor"),
    (torch.randn(4, 0), torch.randn(4, 0), None, ValueError, "V >= 1"),
    (torch.randn(4, 10), torch.randn(4, 10), torch.zeros(5, dtype=torch.long), ValueError, "targets shape"),
    (torch.randn(4, 10), torch.randn(4, 10), torch.zeros(4, dtype=torch.int32), TypeError, "int64"),
    (torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), ValueError, r"targets\[2\] = 10 is outside"),
])
def test_bad_inputs(ref_logits, logits, targets, error, match):
    with pytest.raises(error, match=match):
        token_kl(ref_logits, logits, targets)


def test_bad_impl():
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        token_kl(torch.randn(2, 3), torch.randn(2, 3), impl="fast")
    if not (INTERPRET or CUDA):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            token_kl(torch.randn(2, 3), torch.randn(2, 3), impl="triton")


# ---- Triton, natively on CUDA or in the interpreter ------------------------------------------------------

@pytest.mark.skipif(not (INTERPRET or CUDA), reason="the launcher needs CUDA or TRITON_INTERPRET=1")
def test_triton_configs_and_rising_maxima():
    """Small vocabulary blocks and several rows per program, on rows whose maximum rises in every
    block (every merge rescales the four sums) or sits in the last block only."""
    from lmloss.ops import kl_triton
    V = 203
    ref_logits = torch.randn(6, V, device=DEVICE) * 3
    ref_logits[0] = torch.linspace(-20, 20, V, device=DEVICE)  # rising in every block
    ref_logits[1, :-1] = float("-inf")  # all -inf but the last column
    logits = ref_logits + 0.01 * torch.randn(6, V, device=DEVICE)
    logits[1] = torch.randn(V, device=DEVICE)
    logits[2] = torch.linspace(20, -20, V, device=DEVICE)  # the model falls where the reference rises
    targets = torch.randint(0, V, (6,), device=DEVICE)
    for config in (None, (16, 1, 1), (32, 4, 2), (256, 8, 4)):
        kl, nll_ref, nll, am_ref, am = kl_triton.token_kl(ref_logits, logits, targets, -100, config=config)
        assert_kl_close(kl, ref_logits, logits, "triton")
        torch.testing.assert_close(nll.double(), nll_float64(logits, targets), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(nll_ref.double(), nll_float64(ref_logits, targets), rtol=1e-6, atol=1e-5)
        assert torch.equal(am_ref, ref_logits.argmax(-1)) and torch.equal(am, logits.argmax(-1))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRET or CUDA, reason="already running the triton cases directly")
def test_triton_kernel_in_interpreter(triton_interpreter):
    triton_interpreter(__file__)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape, ref_dtype, dtype", [
    ((4096, 50257), torch.bfloat16, torch.bfloat16),
    ((4096, 50257), torch.float32, torch.bfloat16),
    ((512, 262144), torch.float32, torch.float32),
])
def test_triton_at_scale(shape, ref_dtype, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ref_logits = (torch.randn(shape, device="cuda", generator=gen) * 3).to(ref_dtype)
    logits = (ref_logits.float() + 0.05 * torch.randn(shape, device="cuda", generator=gen)).to(dtype)
    targets = torch.randint(0, shape[1], shape[:1], device="cuda", generator=gen)
    out = token_kl(ref_logits, logits, targets, impl="triton")
    assert_kl_close(out.kl, ref_logits, logits, "triton")
    torch.testing.assert_close(out.nll.double(), nll_float64(logits, targets), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax_ref, ref_logits.argmax(-1)) and torch.equal(out.argmax, logits.argmax(-1))
    chunked = token_kl(ref_logits, logits, targets, impl="chunked")  # CUDA without Triton
    assert_kl_close(chunked.kl, ref_logits, logits, "chunked")
