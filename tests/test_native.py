"""impl="native" (lmloss/ops/native.py, native_cpu.c): its build, its cache, its fallbacks, and the cases that only
the C loops have (row strides, the per-thread ranges, the 512-column partial sums, masked and overflowing rows).
test_ops.py runs it through every contract test of the other implementations as well."""

import math
import shutil

import pytest
import torch

import lmloss
from lmloss.ops import native

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def _ref_nll(x, t, ignore_index=-100):
    """float64 per-token NLL, written here: logsumexp - target logit, 0 where ignored."""
    x64 = x.double()
    valid = t != ignore_index
    nll = torch.logsumexp(x64, 1) - x64.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return torch.where(valid, nll, 0.0)


def _ref_grad(x, t, g, ignore_index=-100):
    x64 = x.double()
    p = torch.softmax(x64, 1)
    valid = t != ignore_index
    p[valid, t[valid]] -= 1
    return p * torch.where(valid, g.double(), 0.0)[:, None]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """native's module state reset, with its cache under tmp_path."""
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(native, "_omp", native._omp)  # restored after the test, with _lib
    return tmp_path


def test_builds_where_a_compiler_is():
    """Where cc/gcc/clang exists the library must build: test_ops.py would otherwise drop "native" silently."""
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine")
    ok, why = native.status()
    assert ok, why


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_built_once_then_served_from_the_cache(fresh, monkeypatch):
    assert native.available()
    built = list((fresh / "native").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_lib", None)  # a new process, as far as the module knows
    calls = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert native.available()
    assert [c for c in calls if "-o" in c] == []  # no compile, only `cc --version` for the key
    assert built[0].stat().st_mtime_ns == mtime


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_a_changed_source_or_cpu_gets_a_new_library(fresh, monkeypatch, tmp_path_factory):
    assert native.available()
    first = set((fresh / "native").glob("*.so"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags: another cpu")
    assert native.available()
    second = set((fresh / "native").glob("*.so"))
    assert len(second) == 2 and first < second
    src = tmp_path_factory.mktemp("src") / "native_cpu.c"
    src.write_text(native._SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "_SOURCE", src)
    monkeypatch.setattr(native, "_lib", None)
    assert native.available()
    assert len(set((fresh / "native").glob("*.so"))) == 3


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_a_damaged_library_is_rebuilt(fresh):
    path = native._build()  # built, not loaded: a process never rewrites a library it has mapped
    path.write_bytes(b"not an ELF file")
    assert native.available(), native.status()[1]
    assert path.read_bytes()[:4] == b"\x7fELF"
    x = torch.randn(3, 70)
    t = torch.tensor([0, 5, 69])
    torch.testing.assert_close(lmloss.token_nll(x, t, impl="native").double(), _ref_nll(x, t), atol=2e-6, rtol=0)


def test_turned_off_or_no_compiler_falls_back_with_a_reason(fresh, monkeypatch):
    x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    monkeypatch.setenv("LMLOSS_NATIVE", "0")
    ok, why = native.status()
    assert not ok and "LMLOSS_NATIVE=0" in why
    from lmloss.ops._checks import choose_impl
    assert choose_impl("auto", torch.device("cpu"), lmloss.IMPLS) == "chunked"
    with pytest.raises(RuntimeError, match="impl='native' is not available here: LMLOSS_NATIVE=0.*impl='chunked'"):
        lmloss.token_nll(x, t, impl="native")
    torch.testing.assert_close(lmloss.token_nll(x, t).double(), _ref_nll(x, t), atol=2e-6, rtol=0)  # auto: eager
    monkeypatch.delenv("LMLOSS_NATIVE")
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "_lib", None)
    ok, why = native.status()
    assert not ok and "/nonexistent/cc" in why


needs_native = pytest.mark.skipif(not native.available(), reason="native library not built here")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 15, 16, 17, 511, 512, 513, 1537, 50257])
def test_odd_widths_against_float64(dtype, V):
    """Widths around the vector (16) and the partial-sum (512) lengths; forward and backward."""
    torch.manual_seed(V)
    N = 37
    x = (torch.randn(N, V) * 8).to(dtype)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    g = torch.rand(N)
    xg = x.clone().requires_grad_()
    nll = lmloss.token_nll(xg, t, impl="native")
    (grad,) = torch.autograd.grad(nll, xg, g)
    assert nll.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(nll.double(), _ref_nll(x, t), atol=4e-6, rtol=1e-6)
    ulp = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad.double(), _ref_grad(x, t, g), atol=ulp, rtol=ulp)


@needs_native
def test_row_strides_and_views():
    """logits[:, :-1] of a (B, T, V) tensor: rows a stride apart, not V; a transposed tensor: the eager path."""
    torch.manual_seed(0)
    full = torch.randn(3, 9, 301) * 5
    ids = torch.randint(0, 301, (3, 9))
    x, t = full[:, :-1], ids[:, 1:]
    got = lmloss.token_nll(x, t, impl="native")
    want = _ref_nll(x.reshape(-1, 301), t.reshape(-1)).reshape(3, 8)
    torch.testing.assert_close(got.double(), want, atol=4e-6, rtol=0)
    xt = torch.randn(301, 40).t()  # (40, 301), column stride 40
    tt = torch.randint(0, 301, (40,))
    assert not native.handles(xt)
    torch.testing.assert_close(lmloss.token_nll(xt, tt, impl="native").double(), _ref_nll(xt, tt), atol=4e-6, rtol=0)


@needs_native
def test_masked_overflowing_and_nan_rows():
    """-inf logits (masked vocabulary) count 0; a logit 100+ nats above the target's overflows the target-shifted
    sum and the row is redone exactly; NaN and +inf rows give what the eager path gives."""
    x = torch.randn(6, 1000)
    x[0, 10:500] = -math.inf
    x[1, 7] = 300.0
    x[2, 3] = math.nan
    x[3, 9] = math.inf
    x[4, :] = -1e4  # all far below zero: every 2^y underflows to 0 in the C loop, except the target's
    t = torch.tensor([1, 2, 3, 4, 5, 6])
    got = lmloss.token_nll(x, t, impl="native").double()
    want = torch.nn.functional.cross_entropy(x.double(), t, reduction="none")
    torch.testing.assert_close(got[[0, 1, 4, 5]], want[[0, 1, 4, 5]], atol=1e-5, rtol=1e-6)
    eager = lmloss.token_nll(x, t, impl="chunked").double()  # NaN, and +inf (lse is +inf), as test_ops requires
    assert math.isnan(got[2]) and math.isnan(eager[2]) and got[3] == eager[3] == math.inf
    xg = x[[0, 1, 4, 5]].clone().requires_grad_()
    (grad,) = torch.autograd.grad(lmloss.token_nll(xg, t[[0, 1, 4, 5]], impl="native").sum(), xg)
    torch.testing.assert_close(grad.double(), _ref_grad(x[[0, 1, 4, 5]], t[[0, 1, 4, 5]], torch.ones(4)),
                               atol=1e-6, rtol=1e-5)


@needs_native
def test_threads_give_the_same_bits():
    """Rows are independent: any split of them between worker threads gives bitwise the same results."""
    torch.manual_seed(1)
    x = (torch.randn(203, 3001) * 6).bfloat16()
    t = torch.randint(0, 3001, (203,))
    g = torch.rand(203)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_()
            nll = lmloss.token_nll(xg, t, impl="native")
            outs.append((nll, torch.autograd.grad(nll, xg, g)[0]))
    finally:
        torch.set_num_threads(before)
    for nll, grad in outs[1:]:
        assert torch.equal(nll, outs[0][0]) and torch.equal(grad, outs[0][1])


@needs_native
def test_inputs_untouched_and_float64_goes_to_the_eager_path():
    x = torch.randn(5, 77)
    keep = x.clone()
    t = torch.randint(0, 77, (5,))
    xg = x.requires_grad_()
    torch.autograd.grad(lmloss.token_nll(xg, t, impl="native").sum(), xg)
    assert torch.equal(x.detach(), keep)
    x64 = keep.double()
    assert not native.handles(x64)
    torch.testing.assert_close(lmloss.token_nll(x64, t, impl="native"), _ref_nll(x64, t), atol=1e-12, rtol=0)


GCC = shutil.which("gcc") is not None and "Free Software Foundation" in __import__("subprocess").run(
    ["gcc", "--version"], capture_output=True, text=True).stdout
TORCH_ON_LIBGOMP = len(native._openmp_runtimes()) == 1


@pytest.mark.skipif(not (GCC and TORCH_ON_LIBGOMP and native.available()),
                    reason="needs GCC and a torch on GCC's OpenMP runtime (the Linux wheels)")
def test_rows_run_on_torchs_own_openmp_threads():
    """Built with -fopenmp, the library binds to the libgomp torch loaded: one OpenMP runtime in the process."""
    runtime = native._openmp_runtimes()
    assert native._omp and len(runtime) == 1
    assert "torch" in next(iter(runtime))  # the wheel's copy, not a second runtime from the system
    assert "OpenMP" in native.status()[1]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openmp_and_python_threads_give_the_same_bits(monkeypatch, dtype):
    """The OpenMP drivers and parallel_rows split the same per-row loops: bitwise equal forward, backward and
    attention probabilities (and right against float64)."""
    torch.manual_seed(3)
    x = (torch.randn(157, 2049) * 5).to(dtype)
    x[7, 11] = float("nan")
    t = torch.randint(0, 2049, (157,))
    t[3] = -100
    g = torch.rand(157)
    scores = torch.randn(93, 300)
    stacked = torch.randn(3 * 40, 300)  # three heads' 40 rows each, as cpu_attention stacks them
    o = torch.randn(3, 40, 24)

    def run():
        xg = x.clone().requires_grad_()
        nll = lmloss.token_nll(xg, t, impl="native")
        s, sums = scores.clone(), torch.empty(93)
        bad = native.causal_probs(s, 208, 0.3, sums)
        s2, sums2 = stacked.clone(), torch.empty(120)
        native.causal_probs(s2, 250, 0.3, sums2, period=40)
        out = torch.empty(40, 5, 3, 24)[:, 1]  # (rows, group, Dv) inside a wider tensor
        native.divide_rows(o, sums2.view(3, 40), out)
        return nll, torch.autograd.grad(nll, xg, g)[0], s, sums, bad, s2, sums2, out

    outs = []
    for omp in (native._omp, False):
        monkeypatch.setattr(native, "_omp", omp)
        outs.append(run())
    for a, b in zip(*outs):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN where NaN
        else:
            assert a == b
    nll = outs[0][0]
    assert nll[7].isnan() and nll[3] == 0
    ok = torch.arange(157) != 7
    torch.testing.assert_close(nll[ok].double(), _ref_nll(x.float(), t)[ok], atol=2e-5 if dtype == torch.float32 else 1e-4, rtol=0)
    k = (torch.arange(93) + 208).clamp(max=300)  # row i sees columns j < 208 + i
    mask = torch.arange(300)[None, :] < k[:, None]
    z = torch.where(mask, scores.double() * (0.3 / math.log2(math.e)), -math.inf)  # c = scale * log2(e)
    p = torch.exp(z - z.amax(1, keepdim=True))
    torch.testing.assert_close(outs[0][2].double(), p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][3].double(), p.sum(1), atol=0, rtol=1e-5)
    # stacked heads: row i of each head sees j < 250 + i
    seen = torch.arange(300)[None, :] < (250 + torch.arange(120) % 40)[:, None]
    z = torch.where(seen, stacked.double() * (0.3 / math.log2(math.e)), -math.inf)
    p2 = torch.exp(z - z.amax(1, keepdim=True))
    torch.testing.assert_close(outs[0][5].double(), p2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][6].double(), p2.sum(1), atol=0, rtol=1e-5)
    assert torch.equal(outs[0][7], (o / outs[0][6].view(3, 40, 1)).transpose(0, 1))  # torch.div's numbers


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_an_openmp_build_that_fails_falls_back_to_the_plain_one(fresh, monkeypatch):
    """A compiler that cannot build or link the OpenMP library still gives a working one, on Python threads."""
    monkeypatch.setattr(native, "_openmp_flags", lambda version: ("-fopenmp", "-fno-such-flag-lmloss"))
    ok, why = native.status()
    assert ok and not native._omp and "Python worker threads" in why
    assert len(list((fresh / "native").glob("*.so"))) == 1
    x, t = torch.randn(9, 515), torch.randint(0, 515, (9,))
    torch.testing.assert_close(lmloss.token_nll(x, t, impl="native").double(), _ref_nll(x, t), atol=2e-6, rtol=0)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_openmp_turned_off(fresh, monkeypatch):
    monkeypatch.setenv("LMLOSS_NATIVE_OPENMP", "0")
    assert native.available() and not native._omp
