"""Fused linear cross-entropy against a float64 reference written here, independent of lmloss."""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmloss
import lmloss.ops.linear as linear_mod
from lmloss.ops import native, onednn


def reference_nll(hidden, weight, targets, bias=None, softcap=None, ignore_index=-100):
    """float64 NLL per token: logsumexp(z) - z[target], z = h @ W.T + b (softcapped); 0 if ignored."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    z = torch.cat([h @ w.double().T for w in weight.split(8192)], dim=1)  # (N, V), no f64 W copy
    if bias is not None:
        z += bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = t != ignore_index
    nll = torch.logsumexp(z, dim=1) - z.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
    return torch.where(keep, nll, 0.0).reshape(targets.shape)


def torch_nll(hidden, weight, targets, bias=None, softcap=None, ignore_index=-100):
    """What plain PyTorch gives in the inputs' own dtype (the logits rounded to that dtype)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="none").reshape(targets.shape)


def make(N, d, V, *, dtype=torch.float32, scale=10.0, bias=False, n_ignored=3, seed=0):
    """hidden (N, d), weight (V, d) with logits of standard deviation ~scale, targets with ignores."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * (scale / math.sqrt(d))).to(dtype)
    b = (torch.randn(V, generator=g) * scale).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, b, targets


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def assert_no_worse_than_torch(out, hidden, weight, targets, bias=None, softcap=None):
    """CCE's rule: |fast - f64| <= |torch in the same dtype - f64| + tol, token by token."""
    ref = reference_nll(hidden, weight, targets, bias, softcap)
    err_fast = (out.double() - ref).abs()
    err_torch = (torch_nll(hidden, weight, targets, bias, softcap).double() - ref).abs()
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert (err_fast <= err_torch + TOL[hidden.dtype]).all(), (err_fast.max(), err_torch.max())
    assert torch.all(out[targets == -100] == 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_matches_reference(dtype, bias, softcap):
    hidden, weight, b, targets = make(37, 64, 50257, dtype=dtype, bias=bias)
    before = [x.clone() for x in (hidden, weight, targets)]
    out = lmloss.linear_token_nll(hidden, weight, targets, bias=b, softcap=softcap)
    assert_no_worse_than_torch(out, hidden, weight, targets, b, softcap)
    assert all(torch.equal(x, y) for x, y in zip((hidden, weight, targets), before))


@pytest.mark.parametrize("N,d,V,scale", [
    (16, 1024, 50257, 30.0),
    (16, 256, 151936, 10.0),
    (8, 64, 262144, 1.0),
    pytest.param(8, 640, 262144, 30.0, marks=pytest.mark.slow),  # Gemma-3-270m's head
    pytest.param(8, 1024, 262144, 10.0, marks=pytest.mark.slow),
])
def test_vocabulary_and_hidden_sizes(N, d, V, scale):
    hidden, weight, b, targets = make(N, d, V, scale=scale, n_ignored=1)
    out = lmloss.linear_token_nll(hidden, weight, targets, chunk_size=4096)
    assert_no_worse_than_torch(out, hidden, weight, targets)


@pytest.mark.slow
def test_bf16_large_vocab_with_bias_and_softcap():
    hidden, weight, b, targets = make(8, 256, 262144, dtype=torch.bfloat16, bias=True, n_ignored=2)
    out = lmloss.linear_token_nll(hidden, weight, targets, bias=b, softcap=30.0)
    assert_no_worse_than_torch(out, hidden, weight, targets, b, 30.0)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1000, 5000])
def test_block_boundaries(monkeypatch, chunk_size):
    """Tiles that split rows and columns unevenly; a tiny tile budget forces many row blocks (and,
    on the CPU, rows split over the intra-op threads)."""
    monkeypatch.setattr(linear_mod, "_TILE_ELEMS", 3000)
    monkeypatch.setattr(linear_mod, "_CPU_TILE_ELEMS", 3000)
    hidden, weight, b, targets = make(23, 16, 1000, dtype=torch.float64, bias=True)
    out = lmloss.linear_token_nll(hidden, weight, targets, bias=b, chunk_size=chunk_size)
    ref = reference_nll(hidden, weight, targets, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_leading_shape_and_non_contiguous_hidden():
    """(B, T, d) hidden sliced [:, :-1] as in next-token shifting; targets (B, T-1)."""
    hidden, weight, _, _ = make(3 * 11, 32, 5003)
    hidden = hidden.reshape(3, 11, 32)[:, :-1]
    targets = torch.randint(0, 5003, (3, 10))
    targets[1, 4] = -100
    assert not hidden.is_contiguous()
    out = lmloss.linear_token_nll(hidden, weight, targets)
    assert out.shape == (3, 10)
    assert_no_worse_than_torch(out, hidden, weight, targets)


def test_uniform_logits_give_log_v():
    hidden, weight = torch.randn(5, 8), torch.zeros(50257, 8)
    out = lmloss.linear_token_nll(hidden, weight, torch.tensor([0, 1, 50256, 7, 123]))
    torch.testing.assert_close(out, torch.full((5,), math.log(50257)), rtol=1e-6, atol=0)


def test_ignore_index_and_all_ignored():
    hidden, weight, _, _ = make(6, 16, 300)
    targets = torch.tensor([3, 5, 7, 7, 1, 2])
    out = lmloss.linear_token_nll(hidden, weight, targets, ignore_index=7)
    assert out[2] == 0.0 and out[3] == 0.0 and (out[[0, 1, 4, 5]] > 0).all()
    none = torch.full((6,), -100)
    assert torch.equal(lmloss.linear_token_nll(hidden, weight, none), torch.zeros(6))
    mean = lmloss.linear_cross_entropy(hidden, weight, none)
    assert math.isnan(mean) and math.isnan(F.cross_entropy(hidden @ weight.T, none))


def test_nan_in_hidden_gives_nan_for_that_token():
    hidden, weight, _, targets = make(4, 16, 300, n_ignored=0)
    hidden[2, 0] = float("nan")
    out = lmloss.linear_token_nll(hidden, weight, targets)
    assert out[2].isnan() and out[[0, 1, 3]].isfinite().all()


@pytest.mark.skipif(not (native.on_torch_threads() and onednn.available()),
                    reason="needs oneDNN and the native library on torch's OpenMP threads")
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 5003])
def test_cpu_float32_tiles_folded_in_c(monkeypatch, chunk_size):
    """CPU float32 without bias or softcap: oneDNN tiles folded by native.fold_tile (several row tiles and
    workers here), no worse than torch against float64 and equal to the eager fold's numbers to rounding;
    a row of +inf, NaN and overflowing logits exactly where the eager fold has them."""
    monkeypatch.setattr(linear_mod, "_CPU_TILE_ELEMS", 3000)
    calls = []
    real = native.fold_tile
    monkeypatch.setattr(native, "fold_tile", lambda *a: calls.append(1) or real(*a))
    hidden, weight, _, targets = make(37, 19, 5003)
    weight[4000] = hidden[5] * 30  # row 5: a logit ~500 nats above the earlier tiles
    weight[4001, 0] = float("inf")  # +inf or -inf logits in column 4001, by the sign of h[:, 0]
    hidden[9, 3] = float("nan")  # row 9: NaN
    out = lmloss.linear_token_nll(hidden, weight, targets, chunk_size=chunk_size)
    assert calls
    monkeypatch.setattr(linear_mod, "_native_tiles", lambda *a: False)
    eager = lmloss.linear_token_nll(hidden, weight, targets, chunk_size=chunk_size)
    assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf())
    ok = out.isfinite()
    torch.testing.assert_close(out[ok], eager[ok], rtol=2e-6, atol=2e-5)
    neg = hidden[:, 0] < 0  # there column 4001's logit is -inf and adds nothing; elsewhere +inf: NaN, as F.ce
    assert out[~neg].isnan().all() and out[9].isnan()
    rows = neg & (targets != 4001) & (torch.arange(37) != 9)
    w_without = torch.cat([weight[:4001], weight[4002:]])
    t_without = torch.where(targets > 4001, targets - 1, targets)
    ref = reference_nll(hidden[rows], w_without, t_without[rows])
    torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck_float64(monkeypatch, bias, softcap):
    monkeypatch.setattr(linear_mod, "_TILE_ELEMS", 20)  # several row blocks, several col blocks
    monkeypatch.setattr(linear_mod, "_CPU_TILE_ELEMS", 20)
    hidden, weight, b, targets = make(7, 5, 23, dtype=torch.float64, bias=bias, n_ignored=2)
    args = [x.requires_grad_() for x in (hidden, weight) + ((b,) if bias else ())]
    for reduction in ("mean", "sum", "none"):
        fn = lambda h, w, *bb: lmloss.linear_cross_entropy(
            h, w, targets, bias=bb[0] if bb else None, softcap=softcap, reduction=reduction,
            chunk_size=6)
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gradients_against_float64_autograd(dtype, softcap):
    hidden, weight, b, targets = make(33, 64, 8191, dtype=dtype, bias=True, n_ignored=5)
    before = [x.clone() for x in (hidden, weight, b, targets)]
    ins = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    loss = lmloss.linear_cross_entropy(*ins[:2], targets, bias=ins[2], softcap=softcap)
    loss.backward()
    ref_ins = [x.double().requires_grad_() for x in (hidden, weight, b)]
    ref_loss = reference_nll(*ref_ins[:2], targets, ref_ins[2], softcap).sum() / (targets != -100).sum()
    ref_loss.backward()
    torch_ins = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    torch_nll(*torch_ins[:2], targets, torch_ins[2], softcap).sum().div((targets != -100).sum()).backward()
    assert abs(loss.item() - ref_loss.item()) < TOL[dtype] + abs(ref_loss.item()) * 1e-6
    for mine, ref, plain in zip(ins, ref_ins, torch_ins):
        assert mine.grad.dtype == dtype
        err = (mine.grad.double() - ref.grad).abs().max()
        err_torch = (plain.grad.double() - ref.grad).abs().max()
        assert err <= err_torch + 1e-5 * ref.grad.abs().max(), (err, err_torch)
    assert all(torch.equal(x, y) for x, y in zip((hidden, weight, b, targets), before))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_tensor_core_backward_path_emulated_on_cpu(monkeypatch, softcap):
    """The CUDA bf16 backward (products on the tensor cores, float32 output, dz rounded to bf16 as
    the operand), run here with a CPU stand-in for torch.mm(..., out_dtype=float32); chunk_size
    and the tile budget force several row and vocabulary blocks."""
    from lmloss.ops import _mm

    monkeypatch.setattr(_mm, "has_mm_f32", lambda device, dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(_mm, "mm_f32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(linear_mod, "_TILE_ELEMS", 2000 * 10)
    hidden, weight, b, targets = make(33, 64, 8191, dtype=torch.bfloat16, bias=True, n_ignored=5)
    ins = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    lmloss.linear_cross_entropy(*ins[:2], targets, bias=ins[2], softcap=softcap, chunk_size=2000).backward()
    ref_ins = [x.double().requires_grad_() for x in (hidden, weight, b)]
    (reference_nll(*ref_ins[:2], targets, ref_ins[2], softcap).sum() / (targets != -100).sum()).backward()
    torch_ins = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    torch_nll(*torch_ins[:2], targets, torch_ins[2], softcap).sum().div((targets != -100).sum()).backward()
    for mine, ref, plain in zip(ins, ref_ins, torch_ins):
        assert mine.grad.dtype == torch.bfloat16
        err = (mine.grad.double() - ref.grad).abs().max()
        err_torch = (plain.grad.double() - ref.grad).abs().max()
        assert err <= err_torch + 1e-5 * ref.grad.abs().max(), (err, err_torch)


def test_add_product_takes_the_in_place_product_where_torch_has_it(monkeypatch):
    """_mm.add_product_: acc += a @ b in float32 for bf16 operands, by one in-place GEMM where the
    check says torch can (here a CPU stand-in for CUDA's addmm with out_dtype), else by a float32
    product and a sum; same-dtype operands by addmm_. Each against float64."""
    from lmloss.ops import _mm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g).bfloat16(), torch.randn(7, 3, generator=g).bfloat16()
    ref = 0.5 + a.double() @ b.double()
    assert not _mm.has_addmm_f32(a.device, a.dtype) and not _mm.has_mm_f32(a.device, a.dtype)
    acc = torch.full((5, 3), 0.5)
    _mm.add_product_(acc, a, b)  # the CPU has neither CUDA product: upcast, then a sum
    torch.testing.assert_close(acc.double(), ref, rtol=1e-6, atol=1e-6)
    used = []
    monkeypatch.setattr(_mm, "has_addmm_f32", lambda device, dtype: True)
    monkeypatch.setattr(_mm, "addmm_f32_", lambda acc, a, b: used.append(acc) or acc.addmm_(a.float(), b.float()))
    acc = torch.full((5, 3), 0.5)
    _mm.add_product_(acc, a, b)
    assert len(used) == 1 and used[0] is acc
    torch.testing.assert_close(acc.double(), ref, rtol=1e-6, atol=1e-6)
    acc64 = torch.full((5, 3), 0.5, dtype=torch.float64)
    _mm.add_product_(acc64, a.double(), b.double())  # same dtype: addmm_, not the bf16 paths
    assert len(used) == 1
    torch.testing.assert_close(acc64, ref, rtol=1e-12, atol=1e-12)


def test_only_hidden_needs_grad():
    hidden, weight, _, targets = make(9, 16, 300, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    lmloss.linear_cross_entropy(h, weight, targets, reduction="sum").backward()
    ref_h = hidden.clone().requires_grad_()
    reference_nll(ref_h, weight, targets).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)


def test_errors_are_clear(monkeypatch):
    hidden, weight, _, targets = make(4, 8, 50)
    with pytest.raises(ValueError, match="share d"):
        lmloss.linear_token_nll(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="leading shape"):
        lmloss.linear_token_nll(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="one dtype"):
        lmloss.linear_token_nll(hidden.bfloat16(), weight, targets)
    with pytest.raises(TypeError, match="floating-point"):
        lmloss.linear_token_nll(hidden.long(), weight.long(), targets)
    with pytest.raises(TypeError, match="int64"):
        lmloss.linear_token_nll(hidden, weight, targets.int())
    with pytest.raises(ValueError, match=r"in \[0, 50\)"):
        lmloss.linear_token_nll(hidden, weight, torch.tensor([1, 2, 50, 3]))
    with pytest.raises(ValueError, match=r"in \[0, 50\) or ignore_index=-100, found -1"):
        lmloss.linear_cross_entropy(hidden.requires_grad_(), weight, torch.tensor([1, -1, 2, 3]))
    with pytest.raises(ValueError, match="bias"):
        lmloss.linear_token_nll(hidden, weight, targets, bias=torch.zeros(49))
    with pytest.raises(ValueError, match="impl"):
        lmloss.linear_token_nll(hidden, weight, targets, impl="nope")
    with pytest.raises(ValueError, match="reduction"):
        lmloss.linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        lmloss.linear_token_nll(hidden, weight, targets, softcap=-1.0)
    from lmloss.ops import linear as lin

    monkeypatch.setattr(lin, "TRITON_BACKWARD", "fastest")
    with pytest.raises(ValueError, match=r"TRITON_BACKWARD must be one of \('atomic', 'chunks'\), got 'fastest'"):
        lmloss.linear_cross_entropy(hidden.requires_grad_(), weight, targets)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch, lmloss, test_linear as T
    cases = [(torch.float32, False, None, 19, 40, 301), (torch.float32, True, 5.0, 70, 33, 1000),
             (torch.bfloat16, True, None, 19, 40, 301), (torch.float16, False, 5.0, 5, 16, 77)]
    for dtype, bias, softcap, N, d, V in cases:
        hidden, weight, b, targets = T.make(N, d, V, dtype=dtype, bias=bias)
        before = [x.clone() for x in (hidden, weight, targets)]
        out = lmloss.linear_token_nll(hidden, weight, targets, bias=b, softcap=softcap, impl="triton")
        T.assert_no_worse_than_torch(out, hidden, weight, targets, b, softcap)
        assert all(torch.equal(x, y) for x, y in zip((hidden, weight, targets), before))
        h = hidden.clone().requires_grad_()
        lmloss.linear_cross_entropy(h, weight, targets, bias=b, softcap=softcap, impl="triton").backward()
        assert h.grad.isfinite().all()
    # tile configurations and tl.dot precision passed as data, as scripts/tune_triton.py does
    from lmloss.ops import linear_triton as lt
    hidden, weight, b, targets = T.make(19, 40, 301, bias=True)
    ref = T.reference_nll(hidden, weight, targets, b)
    keep = targets != -100
    for config in (None, (32, 64, 16, 1, 1), (16, 16, 32, 2, 2)):
        lse, target_logit = lt.linear_lse_target(hidden, weight, targets, b, config=config, precision="ieee")
        torch.testing.assert_close((lse - target_logit)[keep].double(), ref[keep], rtol=1e-5, atol=1e-4)
    print("triton ok")
""")


def _run_interpreted(script: str, done: str, timeout: int = 300) -> None:
    """Run a script of this file's in a fresh python with TRITON_INTERPRET=1 (it must be set before
    triton is imported), test_linear importable; fails with its output unless it prints `done`."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0 and done in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


def test_triton_kernel_in_interpreter():
    """The Triton path on the CPU: TRITON_INTERPRET=1 must be set before triton is imported."""
    _run_interpreted(_TRITON_SCRIPT, "triton ok")


_TRITON_FORWARD_SCRIPT = textwrap.dedent("""
    import math, torch, test_linear as T
    from lmloss.ops import linear_triton as lt

    def z64(hidden, weight, b, softcap):
        z = hidden.double() @ weight.double().T + (b.double() if b is not None else 0.0)
        return softcap * torch.tanh(z / softcap) if softcap is not None else z

    # (N, d, V, config): V a multiple of BLOCK_N or not (the peeled, masked last tile), d a multiple of
    # BLOCK_K or not, N not a multiple of BLOCK_M (rows clamped), several vocabulary splits (the default
    # config asks for 4 programs on the CPU: 19 rows in 16-row blocks -> 2 splits)
    cases = [(19, 40, 301, None), (16, 32, 256, None), (33, 48, 64, (16, 32, 16, 1, 1)),
             (5, 17, 97, (16, 16, 16, 1, 1)), (40, 64, 1000, (32, 64, 32, 1, 1))]
    for N, d, V, config in cases:
        for b_on, softcap in ((False, None), (True, None), (True, 7.0)):
            hidden, weight, b, targets = T.make(N, d, V, bias=b_on, n_ignored=2)
            targets[0], targets[-1] = 0, V - 1  # the first and the last vocabulary entry
            z = z64(hidden, weight, b, softcap)
            lse, tl_ = lt.linear_lse_target(hidden, weight, targets, b, softcap=softcap, config=config,
                                            precision="ieee")
            assert lse.dtype == torch.float64 and tl_.dtype == torch.float32, (lse.dtype, tl_.dtype)
            # lse to float32's rounding of the logits it is built from (~|z| * 6e-8 each); the target logit
            # is one float32 dot product, 0 for ignored rows
            torch.testing.assert_close(lse, torch.logsumexp(z, dim=1), rtol=2e-6, atol=2e-6)
            keep = targets != -100
            want = torch.where(keep, z.gather(1, torch.where(keep, targets, 0)[:, None])[:, 0], 0.0)
            torch.testing.assert_close(tl_.double(), want, rtol=2e-6, atol=2e-6)
            assert (tl_[~keep] == 0).all()
    # huge logits (exp would overflow without the shift) and a near-certain target (nll ~ 0, never < 0)
    hidden, weight, b, targets = T.make(9, 24, 130, scale=400.0, n_ignored=0)
    z = z64(hidden, weight, None, None)
    targets = z.argmax(dim=1)
    lse, tl_ = lt.linear_lse_target(hidden, weight, targets, precision="ieee")
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, torch.logsumexp(z, dim=1), rtol=2e-6, atol=1e-4)
    nll = T.lmloss.linear_token_nll(hidden, weight, targets, impl="triton")
    assert (nll >= 0).all() and nll.max() < 1e-2, nll
    print("triton forward ok")
""")


def test_triton_forward_edges_in_interpreter():
    """The Triton forward's peeled last tile, clamped rows, split vocabulary, uneven d, bias and softcap,
    huge logits: lse (float64) and the target logit against float64, on the CPU under TRITON_INTERPRET=1."""
    _run_interpreted(_TRITON_FORWARD_SCRIPT, "triton forward ok")


def _compile_for_hopper(kernel, types: dict, consts: dict, num_warps: int, num_stages: int):
    """Compile a Triton kernel for sm_90 (H100/H200) on this machine, no GPU needed (triton's own ptxas):
    integer arguments and pointers taken as multiples of 16, as triton specializes them at launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {n: ("constexpr" if n in consts else types[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in consts
             and (types[n].startswith("*") or n in ("D", "C", "c0", "stride_h", "stride_w", "stride_dz",
                                                    "cols_per_split"))}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def test_triton_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """The interpreter runs the kernels' Python, not triton's compiler: compile the default bf16 forward (its
    hot loop and peeled tile), the target-logit kernel, the atomic backward and each form of the chunked
    backward's dz kernel for sm_90, as a lent H100/H200 would, and check the forward's tile loads are
    asynchronous copies and its hot loop's exponentials are one exp2 each, and that the dz kernels run on
    wgmma without register spills."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API ({e})")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from lmloss.ops import linear_triton as lt, linear_triton_chunks as ltc

    ints = dict.fromkeys(("N", "V", "D", "C", "c0", "stride_h", "stride_w", "stride_dz", "cols_per_split",
                          "n_splits", "n_programs"), "i32")
    bf16 = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", softcap="fp32", **ints)
    m, n, k, warps, stages = 256, 128, 64, 8, 3  # lt.default_config for bf16 on a GPU
    fwd = _compile_for_hopper(lt._linear_lse_kernel, dict(bf16, ml_ptr="*fp32", s_ptr="*fp32"),
                              dict(HAS_BIAS=False, HAS_SOFTCAP=False, PRECISION="tf32", UPCAST=False, EVEN_K=True,
                                   BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), warps, stages)
    ptx = fwd.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx, "the tile product should run on wgmma, fed by cp.async"
    assert "setp.eq.b64" not in ptx, "no per-tile search for the target (its logit comes from its own kernel)"
    per_thread = m * n // (32 * warps)  # tile elements per thread, in each of the two copies (loop, peeled)
    # one exp2 per element (and a few per row), each fed by an fma: no subtract per element (the old loop had
    # per_thread + 4 of them, plus a compare, two selects and an add per element for the target and the mask)
    assert 2 * per_thread <= ptx.count("ex2.approx") <= 2 * (per_thread + 8)
    assert max(ptx.count("sub.f32"), ptx.count("mul.f32")) < per_thread // 4, "a subtract or multiply per element"
    assert ptx.count("selp.f32") <= per_thread + 8, "a select per element in the hot loop (only the peeled tile masks)"
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if nvdisasm.is_file():  # the machine code: no register spills (the old loop had 54 STL / 53 LDL)
        cubin = tmp_path / "forward.cubin"
        cubin.write_bytes(fwd.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
        assert "HGMMA" in {o.split(".")[0] for o in ops} and not {"STL", "LDL"} & {o.split(".")[0] for o in ops}
    _compile_for_hopper(lt._target_logit_kernel, dict(bf16, t_ptr="*i64", out_ptr="*fp32"),
                        dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_R=32, BLOCK_K=128), 4, 1)
    bm, bn, bk, w, st = 128, 128, 64, 8, 3  # ltc.default_chunk_config for bf16 on a GPU
    _compile_for_hopper(lt._linear_ce_backward_kernel,  # the atomic backward: _dz_tile with its defaults
                        dict(bf16, t_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32",
                             db_ptr="*fp32", group_m="i32"),
                        dict(HAS_BIAS=False, HAS_SOFTCAP=False, WANT_H=True, WANT_W=True, WANT_B=False,
                             PRECISION="tf32", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, st)
    for form in ltc.DZ_KERNELS:  # each form of the dz kernel: wgmma, and no register spills
        dz_kernel = _compile_for_hopper(
            ltc._dz_chunk_kernel, dict(bf16, t_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", dz_ptr="*bf16",
                                       db_ptr="*fp32"),
            dict(HAS_BIAS=False, HAS_SOFTCAP=False, WANT_B=False, PRECISION="tf32", UPCAST=False,
                 CLAMPED=form != "tiles", EVEN_K=True, PERSISTENT=form == "persistent",
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, st)
        assert "wgmma.mma_async" in dz_kernel.asm["ptx"], form
        if nvdisasm.is_file():
            cubin = tmp_path / f"dz_{form}.cubin"
            cubin.write_bytes(dz_kernel.asm["cubin"])
            sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            ops = {o.split(".")[0] for o in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)}
            assert "HGMMA" in ops and not {"STL", "LDL"} & ops, (form, {"STL", "LDL"} & ops)


_TRITON_BACKWARD_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F, lmloss, test_linear as T
    from lmloss.ops import linear as lin, linear_triton as lt, linear_triton_chunks as ltc
    torch.manual_seed(0)  # the upstream gradients below: torch seeds each process at random otherwise

    def grads64(hidden, weight, b, targets, softcap, reduction, g, ignore_index):
        # float64 autograd of F.cross_entropy((h @ W.T + b), t), independent of lmloss
        leaves = [x.double().requires_grad_() for x in (hidden, weight) + ((b,) if b is not None else ())]
        z = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0.0)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)
        (loss * g).sum().backward() if reduction == "none" else loss.backward()
        return [x.grad for x in leaves]

    def grads_torch(hidden, weight, b, targets, softcap, reduction, g, ignore_index):
        # plain PyTorch in the inputs' dtype: logits rounded to it, their gradient too
        leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((b,) if b is not None else ())]
        z = leaves[0] @ leaves[1].T
        z = (z + leaves[2] if b is not None else z).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)
        (loss * g.float()).sum().backward() if reduction == "none" else loss.backward()
        return [x.grad for x in leaves]

    N, d, V = 37, 24, 101  # odd everywhere: partial row, vocabulary and d blocks
    cases = [  # dtype, bias, softcap, reduction, ignore_index, config, group_rows
        (torch.float32, True, None, "none", -100, None, None),
        (torch.float32, True, 3.0, "mean", -100, (16, 16, 16, 1, 1), 16),  # 3 groups of one row block
        (torch.float32, False, 3.0, "sum", 7, (32, 16, 32, 1, 1), None),  # BLOCK_K > d; ignore_index a real id
        (torch.bfloat16, True, None, "sum", -100, None, None),
        (torch.bfloat16, False, 3.0, "none", -100, (16, 64, 16, 2, 2), 32),
        (torch.float16, True, 3.0, "none", -100, None, None),
    ]
    for dtype, bias, softcap, reduction, ignore_index, config, group_rows in cases:
        hidden, weight, b, targets = T.make(N, d, V, dtype=dtype, bias=bias, n_ignored=4, scale=3.0)
        targets[targets == -100] = ignore_index
        targets[:3] = ignore_index
        g = torch.rand(N, dtype=torch.float64)
        before = [x.clone() for x in (hidden, weight, targets) + ((b,) if bias else ())]
        leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((b,) if bias else ())]
        if config is None and group_rows is None:  # the public path
            out = lmloss.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                                              softcap=softcap, reduction=reduction, ignore_index=ignore_index,
                                              impl="triton")
            (out * g.float()).sum().backward() if reduction == "none" else out.backward()
            mine = [x.grad for x in leaves]
        else:  # the launcher, with tile configurations and L2 groups passed as data
            lse, _ = lt.linear_lse_target(hidden, weight, targets, b, softcap=softcap)
            keep = targets != ignore_index
            upstream = {"none": g.float(), "sum": torch.ones(N), "mean": torch.full((N,), 1.0 / int(keep.sum()))}
            dh, dw, db = lt.linear_backward(hidden, weight, targets, b, lse, torch.where(keep, upstream[reduction], 0.0),
                                            softcap=softcap, want_b=bias, config=config, group_rows=group_rows)
            mine = [dh, dw] + ([db] if bias else [])
        # the chunked Triton backward, on the same upstream gradient: chunks of 32 (4 chunks, the last partial)
        lse, _ = lt.linear_lse_target(hidden, weight, targets, b, softcap=softcap)
        keep = targets != ignore_index
        upstream = {"none": g.float(), "sum": torch.ones(N), "mean": torch.full((N,), 1.0 / int(keep.sum()))}
        chunked = ltc.linear_backward_chunks(hidden, weight, targets, b, lse,
                                             torch.where(keep, upstream[reduction], 0.0), softcap=softcap,
                                             want_b=bias, chunk_cols=32, config=config)
        chunked = list(chunked[:2]) + ([chunked[2]] if bias else [])
        for form in ltc.DZ_KERNELS:  # the dz kernel's other forms compute the same tiles: the same bits
            ltc.DZ_KERNEL = form
            again = ltc.linear_backward_chunks(hidden, weight, targets, b, lse,
                                               torch.where(keep, upstream[reduction], 0.0), softcap=softcap,
                                               want_b=bias, chunk_cols=32, config=config)
            ltc.DZ_KERNEL = "tiles"
            assert all(torch.equal(x, y) for x, y in zip(chunked, again)), form
        assert all(torch.equal(x, y) for x, y in zip((hidden, weight, targets) + ((b,) if bias else ()), before))
        ref = grads64(hidden, weight, b, targets, softcap, reduction, g, ignore_index)
        plain = grads_torch(hidden, weight, b, targets, softcap, reduction, g, ignore_index)
        for name, m, r, p in [*zip(("dh", "dW", "dbias"), mine, ref, plain),
                              *zip(("chunks dh", "chunks dW", "chunks dbias"), chunked, ref, plain)]:
            assert m.dtype == dtype and m.shape == r.shape, (name, m.dtype, m.shape)
            scale = r.abs().max().item()
            err = (m.double() - r).abs().max().item()
            if dtype == torch.float32:
                assert err <= 1e-5 * scale, (dtype, name, err, scale)
            else:  # CCE's rule: no worse than PyTorch in the same dtype, up to one ulp of the largest entry:
                # half for the final rounding to dtype, half for the other order of the operand roundings
                # (30 upstream draws x 2 bf16 cases: the worst excess was 0.62 of it, for both backwards)
                err_torch = (p.double() - r).abs().max().item()
                assert err <= err_torch + torch.finfo(dtype).eps * scale, (dtype, name, err, err_torch, scale)
        assert mine[0][:3].abs().max() == 0 and chunked[0][:3].abs().max() == 0  # ignored rows: no gradient
        print(dtype, bias, softcap, reduction, "ok", flush=True)

    # gradients asked for one input at a time; every target ignored
    hidden, weight, b, targets = T.make(N, d, V, bias=True, n_ignored=0)
    lse, _ = lt.linear_lse_target(hidden, weight, targets, b)
    g = torch.rand(N)
    full = lt.linear_backward(hidden, weight, targets, b, lse, g, want_b=True)
    only_h = lt.linear_backward(hidden, weight, targets, b, lse, g, want_w=False)
    only_w = lt.linear_backward(hidden, weight, targets, b, lse, g, want_h=False)
    assert only_h[1] is None and only_h[2] is None and torch.allclose(only_h[0], full[0], rtol=1e-6, atol=1e-7)
    assert only_w[0] is None and only_w[2] is None and torch.allclose(only_w[1], full[1], rtol=1e-6, atol=1e-7)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lmloss.linear_cross_entropy(h, w, torch.full((N,), -100), reduction="sum", impl="triton").backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    # (B, T, d) hidden sliced [:, :-1]: a non-contiguous input, a gradient of its shape
    h3 = hidden.reshape(1, N, d)[:, :-1].clone().requires_grad_()
    lmloss.linear_cross_entropy(h3[:, :], weight, targets[None, :-1], impl="triton").backward()
    assert h3.grad.shape == (1, N - 1, d) and h3.grad.isfinite().all()
    # the public path with the chunked backward chosen, against the atomic one; want_* one at a time
    hidden, weight, b, targets = T.make(N, d, V, bias=True, n_ignored=3)
    grads = {}
    for choice in ("atomic", "chunks"):
        lin.TRITON_BACKWARD = choice
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
        lmloss.linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], impl="triton").backward()
        grads[choice] = [x.grad for x in leaves]
    lin.TRITON_BACKWARD = "chunks"
    for x, y in zip(grads["atomic"], grads["chunks"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    only_h = ltc.linear_backward_chunks(hidden, weight, targets, b, lse := lt.linear_lse_target(hidden, weight, targets, b)[0],
                                        torch.ones(N), want_w=False, chunk_cols=50)
    only_w = ltc.linear_backward_chunks(hidden, weight, targets, b, lse, torch.ones(N), want_h=False)
    assert only_h[1] is None and only_h[2] is None and only_w[0] is None and only_w[2] is None
    print("triton backward ok")
""")


def test_default_chunk_cols():
    """The chunked backward's default chunk width: all of V or a multiple of the tile width; the dz buffer
    under 5% of the logits at issue #14's shapes (the widths timed there); N x cols >= 2^24 entries wherever
    V allows, so that small N does not leave the GPU waiting for the host's loop."""
    ltc = pytest.importorskip("lmloss.ops.linear_triton_chunks")
    assert ltc.default_chunk_cols(8192, 50257, 128) == 2432 < 0.05 * 50257  # 4.8% of the logits
    assert ltc.default_chunk_cols(8192, 262144, 128) == 13056 < 0.05 * 262144
    assert ltc.default_chunk_cols(2048, 50257, 128) == 8192  # 2^24 / 2048: wider than V / 20
    for N, V, bn in [(16384, 128256, 128), (512, 50257, 64), (40, 300, 32), (1, 7, 16), (3000, 5000, 32)]:
        cols = ltc.default_chunk_cols(N, V, bn)
        assert 0 < cols <= V and (cols == V or cols % bn == 0)
        assert N * cols >= min(N * V, 1 << 24)
        assert cols <= max(V // 20, -(-(1 << 24) // N) + bn)


def test_dz_kernel_form_must_be_known(monkeypatch):
    """An unknown form of the chunked backward's dz kernel is refused before any launch, naming the forms."""
    ltc = pytest.importorskip("lmloss.ops.linear_triton_chunks")
    hidden, weight, _, targets = make(4, 8, 50)
    monkeypatch.setattr(ltc, "DZ_KERNEL", "fastest")
    with pytest.raises(ValueError, match=r"DZ_KERNEL must be one of \('tiles', 'clamped', 'persistent'\), got 'fastest'"):
        ltc.linear_backward_chunks(hidden, weight, targets, None, torch.zeros(4, dtype=torch.float64), torch.ones(4))


def test_triton_backward_in_interpreter():
    """The Triton backward on the CPU (TRITON_INTERPRET=1) against float64 autograd of
    F.cross_entropy(h @ W.T + b, t): dh, dW, dbias with softcap, ignore_index (a real token id
    too), reductions "none" (random upstream grad), "sum" and "mean", float32 / bfloat16 / float16,
    tile configurations with partial blocks everywhere and several L2 groups."""
    _run_interpreted(_TRITON_BACKWARD_SCRIPT, "triton backward ok", timeout=600)


def test_auto_on_cuda_without_triton_falls_back_to_chunked(monkeypatch):
    """A CUDA tensor where triton does not import, as far as a CPU can play it: every dispatcher's rule
    sees a CUDA device and `import triton` fails. "auto" takes the chunked path (no ImportError), in
    linear_token_nll / linear_cross_entropy as in token_nll / logsumexp; impl="triton" says what to install."""
    import lmloss.ops as ops
    from lmloss.ops import _checks

    seen = []

    def rule_on_cuda(impl, device, names):
        seen.append(impl)
        return _checks.choose_impl(impl, torch.device("cuda"), names)

    monkeypatch.setattr(ops, "choose_impl", rule_on_cuda)
    monkeypatch.setattr(linear_mod, "choose_impl", rule_on_cuda)
    for name in ("triton", "lmloss.ops.triton_kernels", "lmloss.ops.linear_triton"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    for name in ("triton_kernels", "linear_triton", "linear_triton_chunks"):  # imported by an earlier test:
        monkeypatch.delattr(ops, name, raising=False)  # `from lmloss.ops import x` would find the attribute
    hidden, weight, b, targets = make(23, 16, 301, bias=True)
    ref = reference_nll(hidden, weight, targets, b)
    torch.testing.assert_close(lmloss.linear_token_nll(hidden, weight, targets, bias=b).double(), ref,
                               rtol=1e-5, atol=1e-5)
    h = hidden.clone().requires_grad_()
    lmloss.linear_cross_entropy(h, weight, targets, bias=b, reduction="sum").backward()
    assert h.grad.isfinite().all()
    logits = hidden @ weight.T + b
    torch.testing.assert_close(lmloss.token_nll(logits, targets).double(), ref, rtol=1e-5, atol=1e-5)
    lmloss.logsumexp(logits)
    assert seen == ["auto"] * 4
    for run in (lambda: lmloss.linear_token_nll(hidden, weight, targets, impl="triton"),
                lambda: lmloss.token_nll(logits, targets, impl="triton")):
        with pytest.raises(ImportError, match="needs triton.*pip install"):
            run()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda(dtype):
    hidden, weight, b, targets = make(1000, 768, 50257, dtype=dtype, bias=True)
    out = lmloss.linear_token_nll(hidden.cuda(), weight.cuda(), targets.cuda(), bias=b.cuda(),
                                  softcap=30.0, impl="triton").cpu()
    assert_no_worse_than_torch(out, hidden, weight, targets, b, 30.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_jumping_far_above_earlier_blocks(dtype):
    """A late vocabulary block whose logits exceed every earlier one by hundreds of nats (the
    exp(z - running lse) overflow path) and a row whose logits fall instead."""
    hidden, weight, b, targets = make(6, 16, 3000, dtype=dtype, scale=1.0, n_ignored=0)
    weight[2900] = hidden[0] * 20  # z[0, 2900] = 20 |h_0|^2, about 300 nats above the rest
    weight[2950] = hidden[1] * 60
    weight[5] = hidden[2] * 60  # row 2: the first block holds the max
    targets[:3] = torch.tensor([2900, 17, 5])
    out = lmloss.linear_token_nll(hidden, weight, targets, chunk_size=256)
    ref = reference_nll(hidden, weight, targets)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    out_b = lmloss.linear_token_nll(hidden, weight, targets, bias=torch.zeros_like(weight[:, 0]),
                                    softcap=500.0, chunk_size=256)
    torch.testing.assert_close(out_b.double(), reference_nll(hidden, weight, targets, softcap=500.0),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_bad_targets_on_cuda(impl):
    """On CUDA the targets' range check is answered after the forward is queued (no sync before it): a
    target at V, or negative and not ignore_index, still raises, for the loss and the per-token NLL, and
    the same call with good targets then gives the float64 reference."""
    hidden, weight, _, targets = (x.cuda() if x is not None else None for x in make(40, 32, 300))
    for bad_value in (300, -7):
        bad = targets.clone()
        bad[[5, 17]] = bad_value
        with pytest.raises(ValueError, match=rf"in \[0, 300\) or ignore_index=-100, found {bad_value}"):
            lmloss.linear_token_nll(hidden, weight, bad, impl=impl)
        with pytest.raises(ValueError, match=rf"found {bad_value}"):
            lmloss.linear_cross_entropy(hidden.clone().requires_grad_(), weight, bad, impl=impl)
    got = lmloss.linear_token_nll(hidden, weight, targets, impl=impl)
    torch.testing.assert_close(got.double(), reference_nll(hidden, weight, targets), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backward", ["atomic", "chunks", "chunks, clamped", "chunks, persistent"])
@pytest.mark.parametrize("V", [50257, 262144])
def test_triton_backward_on_cuda_at_scale(V, backward, monkeypatch):
    """bf16 N=8192, d=768: the Triton backward's dh and dW against float32 PyTorch (the float32
    logits' own gradient), no worse than bf16 PyTorch up to one bf16 ulp of the largest entry; two runs
    agree to a bf16 ulp (the float32 atomics sum in a varying order). Both Triton backwards, the chunked
    one with each form of its dz kernel."""
    from lmloss.ops import linear as lin, linear_triton_chunks as ltc

    monkeypatch.setattr(lin, "TRITON_BACKWARD", backward.split(",")[0])
    monkeypatch.setattr(ltc, "DZ_KERNEL", backward.split(", ")[1] if "," in backward else "tiles")
    N, d = 8192, 768
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, d, device="cuda", generator=g) * (3 / math.sqrt(d))).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[::97] = -100

    def grads(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach().double(), h.grad, w.grad

    ce = lambda h, w: F.cross_entropy((h @ w.T).float(), targets)  # noqa: E731
    ref_loss, ref_dh, ref_dw = grads(ce, hidden.float(), weight.float())
    _, torch_dh, torch_dw = grads(ce, hidden, weight)
    mine = [grads(lambda h, w: lmloss.linear_cross_entropy(h, w, targets, impl="triton"), hidden, weight)
            for _ in range(2)]
    assert abs(mine[0][0] - ref_loss) <= 1e-4 * ref_loss
    for (_, dh, dw), again in zip(mine, (mine[1], mine[0])):
        for name, got, ref, plain, rerun in (("dh", dh, ref_dh, torch_dh, again[1]),
                                             ("dW", dw, ref_dw, torch_dw, again[2])):
            assert got.dtype == torch.bfloat16 and got.shape == ref.shape
            scale = ref.abs().max().item()
            err = (got.float() - ref).abs().max().item()
            err_torch = (plain.float() - ref).abs().max().item()
            assert err <= err_torch + 2**-8 * scale, (name, err, err_torch, scale)
            torch.testing.assert_close(got, rerun, rtol=2**-7, atol=1e-6 * scale)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backward", ["atomic", "chunks", "chunks, dh product then sum", "chunks, clamped",
                                      "chunks, persistent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_on_cuda_bias_softcap_random_grad(dtype, backward, monkeypatch):
    """d=768 (twelve BLOCK_K steps), bias, softcap 30, reduction="none" with a random upstream grad,
    against float64 autograd on the GPU; both Triton backwards, the chunked one also with dh summed
    from separate products (where torch cannot add a bf16 product into float32 in place), and with each
    form of its dz kernel."""
    from lmloss.ops import _mm, linear as lin, linear_triton_chunks as ltc

    if backward == "chunks, dh product then sum":
        monkeypatch.setattr(_mm, "has_addmm_f32", lambda device, dtype: False)
    elif backward.startswith("chunks,"):
        monkeypatch.setattr(ltc, "DZ_KERNEL", backward.split(", ")[1])
    monkeypatch.setattr(lin, "TRITON_BACKWARD", backward.split(",")[0])
    hidden, weight, b, targets = make(1000, 768, 50257, dtype=dtype, bias=True, n_ignored=9, scale=10.0)
    upstream = torch.rand(1000, dtype=torch.float64, device="cuda")
    leaves64 = [x.cuda().double().requires_grad_() for x in (hidden, weight, b)]
    z = 30.0 * torch.tanh((leaves64[0] @ leaves64[1].T + leaves64[2]) / 30.0)
    (F.cross_entropy(z, targets.cuda(), reduction="none") * upstream).sum().backward()
    leaves = [x.cuda().requires_grad_() for x in (hidden, weight, b)]
    nll = lmloss.linear_cross_entropy(leaves[0], leaves[1], targets.cuda(), bias=leaves[2], softcap=30.0,
                                      reduction="none", impl="triton")
    (nll * upstream.float()).sum().backward()
    tol = dict(rtol=1e-4, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=0)  # as tests/test_cuda.py
    for name, got, ref in zip(("dh", "dW", "dbias"), leaves, leaves64):
        assert got.grad.dtype == dtype, name
        scale = ref.grad.abs().max().item()
        err = (got.grad.double() - ref.grad).abs().max().item()
        assert err <= tol["rtol"] * scale, (name, err, scale)
