"""The fused linear cross-entropy's backward by vocabulary chunks: a Triton kernel writes one chunk of
the logits' gradient, and the tensor-core library (cuBLAS through torch.mm) takes the two products.
An alternative to linear_triton.linear_backward, whose float32 atomics are its cost.

For each chunk of `cols` vocabulary entries [c0, c0 + cols), all N rows at once:
    1. dz = (exp(z - lse) - onehot(target)) * g    Triton: z = h @ W[c0:c1].T rebuilt tile by tile in
       dz *= 1 - (z / softcap)^2                    registers (float32, as the forward built it), dz
       dbias[c0:c1] += dz.sum(0)                    stored in the inputs' dtype into one (N, cols)
                                                    buffer, reused for every chunk
    2. dW[c0:c1] = dz.T @ h                         owned by this chunk: written once, no accumulation
    3. dh += dz @ W[c0:c1]                          float32 accumulator, N x d, added to in place by
                                                    the product itself (cuBLAS beta = 1) where torch
                                                    can (lmloss/ops/_mm.py); else a product, then a sum
Products on the tensor cores with float32 output (torch.mm's out_dtype) for bf16/fp16, dz entering
them rounded to the inputs' dtype as torch's own backward rounds it; float32 inputs run float32 products.
A chunk's products take its columns a multiple of 16 bytes at a time, and the last few of an odd V apart.
Cost: the 3 products of N x V x d (the tile rebuild, dW, dh), one write and two reads of the dz chunk in
the inputs' dtype, and N x d float32 read and written per chunk for dh (twice that, and a temporary,
without the in-place accumulation).
Memory beyond the gradients: the dz buffer, N x cols in the inputs' dtype (default_chunk_cols: under 5% of the
logits from N = 2^24 / (V / 20) rows on, e.g. N=8192 with V=50257 or 262144; more below that, at most 32 MiB
in bf16); plus the N x d float32 accumulator of dh (3.1% of the logits at V=50257) and one chunk's dW in float32.
Timed on an H200 (bf16, N=8192, d=768, V=50257, 2026-11-27, scripts/bench_linear_chunks.py --parts): of the
backward's 4.10 ms the dz kernels took 1.63, dW's products 1.14, dh's 1.34. Running dW's product on a second
stream beside dh's, or the next chunk's dz kernel beside this chunk's products (two half-width buffers), did not
help (3.99 and 6.93 ms: the second host-bound at 44 chunks).
The host: per chunk one Triton launch and two or three cuBLAS calls, about 90-130 us of Python on an H200's
host; a chunk narrower than that much GPU work leaves the GPU waiting (scripts/bench_linear_chunks.py).
Deterministic: no atomics except dbias's (bias only). Tested on the CPU with TRITON_INTERPRET=1.
"""
import functools

import torch
import triton
import triton.language as tl

from lmloss.ops import _mm
from lmloss.ops.linear_triton import _dz_tile, backward_inputs, default_precision

_CHUNK_DIVISOR = 20  # chunks of V / 20 columns: the dz buffer under 5% of the logits (issue #14's budget) ...
_MIN_CHUNK_ELEMS = 1 << 24  # ... or of 2^24 / N columns where that is more: enough GPU work per chunk


@triton.jit
def _dz_chunk_tile(pid_m, pid_n, h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, db_ptr,
                   N, C, D, c0, stride_h, stride_w, stride_dz, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_B: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, CLAMPED: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # w_ptr and db_ptr point at the chunk's first vocabulary entry, b_ptr at the whole bias; cols are chunk-local
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    if CLAMPED:  # rows past N and columns past C read row N - 1 and column C - 1: every load in bounds, no masks
        h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_h
        w_rows = w_ptr + tl.minimum(cols, C - 1).to(tl.int64)[:, None] * stride_w
    else:
        h_rows = h_ptr + rows64[:, None] * stride_h
        w_rows = w_ptr + cols64[:, None] * stride_w
    # 1-2. the tile of logits as the forward built it, then dz (linear_triton._dz_tile); targets are
    #      vocabulary ids, so they compare to c0 + cols; rows past N and columns past C give 0
    dz = _dz_tile(h_rows, w_rows, b_ptr, t_ptr, lse_ptr, g_ptr, rows64, cols + c0, row_ok, col_ok, D, softcap,
                  HAS_BIAS, HAS_SOFTCAP, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, CLAMPED, EVEN_K)
    if WANT_B:
        tl.atomic_add(db_ptr + cols64, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    # 3. the tile of dz, rounded once to the buffer's dtype (the inputs')
    tl.store(dz_ptr + rows64[:, None] * stride_dz + cols64[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dz_chunk_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, db_ptr,
                     N, C, D, c0, stride_h, stride_w, stride_dz, softcap, n_programs,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_B: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, CLAMPED: tl.constexpr, EVEN_K: tl.constexpr,
                     PERSISTENT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of the chunk's dz per program (grid: row blocks x column blocks), or with
    PERSISTENT n_programs programs (1-D grid) taking tiles n_programs apart, row blocks fastest, in one loop
    that Triton flattens with the k loop, so that a tile's loads start while the tile before is in its
    epilogue (exp2, the store)."""
    if PERSISTENT:
        n_row_blocks = tl.cdiv(N, BLOCK_M)
        n_tiles = n_row_blocks * tl.cdiv(C, BLOCK_N)
        for tile in tl.range(tl.program_id(0), n_tiles, n_programs, flatten=True):
            _dz_chunk_tile(tile % n_row_blocks, tile // n_row_blocks, h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr,
                           dz_ptr, db_ptr, N, C, D, c0, stride_h, stride_w, stride_dz, softcap,
                           HAS_BIAS, HAS_SOFTCAP, WANT_B, PRECISION, UPCAST, CLAMPED, EVEN_K,
                           BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _dz_chunk_tile(tl.program_id(0), tl.program_id(1), h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr,
                       dz_ptr, db_ptr, N, C, D, c0, stride_h, stride_w, stride_dz, softcap,
                       HAS_BIAS, HAS_SOFTCAP, WANT_B, PRECISION, UPCAST, CLAMPED, EVEN_K,
                       BLOCK_M, BLOCK_N, BLOCK_K)


# The dz kernel's form (timed side by side by scripts/bench_linear_chunks.py --dz-kernels; not yet on a GPU):
#   "tiles"      one tile per program, loads masked at the edges (the form first timed, 2026-11-27)
#   "clamped"    one tile per program, edge rows and columns clamped in bounds: no load masks
#   "persistent" clamped, and one program per SM looping over the tiles (PERSISTENT_PER_SM programs per SM)
DZ_KERNEL = "tiles"
DZ_KERNELS = ("tiles", "clamped", "persistent")
PERSISTENT_PER_SM = 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_chunk_config(h2) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the dz kernel: a plain GEMM tile with an
    elementwise epilogue. bf16: 128 x 128 x 64, 8 warps, 3 stages. Timed on an H200 (2026-11-27,
    `bench_linear_nll.py --sweep-backward chunks`, N=8192, d=768, the whole backward): 4.88 / 18.60 ms
    at V=50257 / 262144; of five others none was faster at both sizes (128 x 256: 1.05x at 50257, 0.96x
    at 262144; 4 warps: 1.03x / 0.96x), and chunks of V/64 and V/128 were 0.71-0.93x and 0.22-0.83x."""
    if not h2.is_cuda:  # the interpreter: small tiles keep the CPU emulation quick
        return 16, 32, 16, 1, 1
    if h2.element_size() == 2:
        return 128, 128, 64, 8, 3
    return 64, 64, 32, 4, 2


def default_chunk_cols(N: int, V: int, block_n: int) -> int:
    """Vocabulary entries per chunk: V / 20 rounded down to the tile width block_n, so that the dz buffer
    (N x cols) is under 5% of the logits; but at least 2^24 / N rounded up to it (N x cols >= 2^24 entries,
    32 MiB in bf16), so that a chunk's GPU work outlasts the host's ~100 us per chunk at small N; at most V.
    Timed on an H200 (2026-11-27, scripts/bench_linear_chunks.py, bf16, d=768), forward+backward against
    torch.compile(mm + F.cross_entropy) in the same run: N=8192, V=50257: 5.72 ms (1.28x; V/24: 1.21x, V/16:
    1.17x at 6.1% of the logits, V/32 as before: 1.25x); V=262144: 25.43 ms (1.13x; V/32: 1.16x). N=2048,
    V=50257: V/32 4.47 ms and V/20 3.78 ms, host-bound (host time per call = GPU time), V/8 2.62 ms, V/4
    2.16 ms; this rule takes 8192 columns there."""
    share = V // _CHUNK_DIVISOR // block_n * block_n
    work = triton.cdiv(triton.cdiv(_MIN_CHUNK_ELEMS, max(1, N)), block_n) * block_n
    return min(V, max(block_n, share, work))


def linear_backward_chunks(h2, weight, t1, bias, lse, g, *, softcap=None, want_h=True, want_w=True,
                           want_b=False, chunk_cols=None, config=None, precision=None):
    """-> (dh, dW, dbias): the same contract and result as linear_triton.linear_backward (gradients of
    sum(g * nll), returned in the inputs' dtypes, None where not wanted), computed by vocabulary
    chunks (module docstring). chunk_cols: vocabulary entries per chunk (default default_chunk_cols);
    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the dz kernel, default
    default_chunk_config(h2)."""
    if DZ_KERNEL not in DZ_KERNELS:
        raise ValueError(f"lmloss.ops.linear_triton_chunks.DZ_KERNEL must be one of {DZ_KERNELS}, got {DZ_KERNEL!r}")
    h2, weight, lse, g, want_b = backward_inputs(h2, weight, bias, lse, g, want_b)
    (N, D), V = h2.shape, weight.shape[0]
    precision = default_precision(h2) if precision is None else precision
    block_m, block_n, block_k, warps, stages = default_chunk_config(h2) if config is None else config
    if chunk_cols is None:
        chunk_cols = default_chunk_cols(N, V, block_n)
    chunk_cols = min(chunk_cols, V)
    dz = torch.empty(N, chunk_cols, dtype=h2.dtype, device=h2.device)  # (N, cols), reused
    dh = torch.zeros(N, D, dtype=torch.float32, device=h2.device) if want_h else None
    dw = torch.empty(V, D, dtype=weight.dtype, device=h2.device) if want_w else None
    db = torch.zeros(V, dtype=torch.float32, device=h2.device) if want_b else None
    # what is the same for every chunk, taken once: the loop's host time per chunk (a Triton launch and two
    # or three cuBLAS calls) must stay below the chunk's GPU time, or the GPU waits for the host
    persistent = DZ_KERNEL == "persistent"
    meta = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WANT_B=want_b,
                PRECISION=precision, UPCAST=not h2.is_cuda, CLAMPED=DZ_KERNEL != "tiles", EVEN_K=D % block_k == 0,
                PERSISTENT=persistent,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    # persistent: this many programs (the interpreter: 3, so that they loop); else a program per tile
    n_programs = (PERSISTENT_PER_SM * _sm_count(h2.device.index if h2.device.index is not None
                                                else torch.cuda.current_device()) if h2.is_cuda else 3)
    b_arg = bias if bias is not None else h2
    cap = float(softcap) if softcap is not None else 1.0
    row_blocks = triton.cdiv(N, block_m)
    strides = (h2.stride(0), weight.stride(0), dz.stride(0))
    align = max(1, 16 // dz.element_size())  # columns per 16 bytes: what cuBLAS's fast kernels want of the sizes
    for c0 in range(0, V, chunk_cols):
        C = min(chunk_cols, V - c0)
        if persistent:
            grid = (min(n_programs, row_blocks * triton.cdiv(C, block_n)),)
        else:
            grid = (row_blocks, triton.cdiv(C, block_n))
        _dz_chunk_kernel[grid](
            h2, weight[c0:], b_arg, t1, lse, g, dz, db[c0:] if want_b else lse, N, C, D, c0, *strides, cap,
            grid[0], **meta)
        # The products take the chunk's columns a multiple of `align` at a time, and the last few (the end of an
        # odd V: 1 of V=50257's) apart: with a size of dz's columns not a multiple of 16 bytes cuBLAS falls back to
        # unaligned kernels, e.g. 194 us for dh's product over V=50257's last 1617 columns on an H200, against
        # 44-50 us for the full 2432-column chunks before it (scripts/bench_linear_chunks.py --parts).
        for a, b in ((0, C // align * align), (C // align * align, C)):
            if a == b:
                continue
            dz_c = dz[:, a:b]  # (N, b - a), row stride chunk_cols
            if want_w:  # 2. these rows of dW: float32 straight into them, bf16/fp16 rounded once
                if dz.dtype == torch.float32:
                    torch.mm(dz_c.T, h2, out=dw[c0 + a:c0 + b])
                else:
                    dw[c0 + a:c0 + b].copy_(_mm.product_f32(dz_c.T, h2))
            if want_h:  # 3. dh += dz @ W[c0+a:c0+b], float32, in place where torch can (addmm_ for float32)
                _mm.add_product_(dh, dz_c, weight[c0 + a:c0 + b])
    cast = lambda acc, like: None if acc is None else acc.to(like.dtype)  # noqa: E731
    return cast(dh, h2), dw, cast(db, bias)
