"""Triton forward and backward of the fused linear cross-entropy (see lmloss/ops/linear.py for the
contract). Neither ever writes a tile of logits, or of their gradient, to memory.

Forward. Each program owns BLOCK_M rows and one slice of the vocabulary. For every BLOCK_N columns of
its slice it builds the (BLOCK_M, BLOCK_N) tile of logits with tl.dot over d in BLOCK_K steps; the
tile lives in registers only, is folded into an online log-sum-exp in base 2, and is dropped:
    ml = max(z) * L,  s = sum(exp2(z * L - ml))              # per row, over the program's slice; L = log2(e)
    lse = log2(sum over slices of 2^(ml + log2(s))) / L      # (N, SPLITS) -> (N,), float64, in torch
    z[target] = h[n] . W[target] (+ bias, softcapped)         # a separate small kernel, float32
Per element of a tile that is one max, one fma, one exp2 and one add: no column mask (rows and the
last tile's columns are clamped in bounds, and only that tile, peeled off the loop, masks), and no
search for the target in every tile. Splitting the vocabulary gives the GPU enough programs when N
is small; the partial results are only (N, SPLITS) floats.

Backward (Cut Cross-Entropy's scheme, Wijmans et al. 2024, arXiv:2411.09009 Sec. 4.2). Each program
owns one (BLOCK_M rows, BLOCK_N vocabulary) tile. It rebuilds the tile of logits as the forward
does, turns it into the tile of dz in registers and sends dz's products straight to float32
accumulators in global memory:
    dz = (exp(z - lse) - onehot(target)) * g          # g: upstream grad, 0 where ignored
    dz *= 1 - (z / softcap)^2                         # softcap: d(c tanh(x/c))/dx, z already capped
    dh[rows]  += dz @ W[cols]                         # (BLOCK_M, d), BLOCK_K columns at a time
    dW[cols]  += dz.T @ h[rows]                       # (BLOCK_N, d)
    dbias[cols] += dz.sum(0)
Every tile adds into rows of dh that other vocabulary blocks also add into (and into rows of dW
that other row blocks add into), so the adds are float32 atomics (relaxed: only the final sums are
read, after the kernel). No program can keep a (BLOCK_M, d) or (BLOCK_N, d) accumulator on chip at
d = 768 and up, which is what rules out an atomics-free split into a row-parallel dh kernel and a
vocabulary-parallel dW kernel without recomputing each tile of logits d / BLOCK_K times.
Cost: 3 products of N x V x d (the tile, dh, dW) and N * V * d * (1/BLOCK_M + 1/BLOCK_N) float32
atomic adds, which land in L2: the tiles run row-block-fastest within groups of rows whose h and
float32 dh fit in L2 (group_rows), so each block of W is read from memory once per group while its
rows of dW collect the adds of the whole group.
Determinism: the float32 sums are exact to float32 rounding, in an order that varies from run to
run (differences near 1e-7 relative, rarely a bf16 last bit after the final cast). No tiles are
skipped (CCE's gradient filtering is not used): the gradient is exact for any distribution.
Memory beyond the returned gradients: the float32 accumulators, N x d and V x d (weight-sized,
not logits-sized), and (N,) vectors; nothing N x V.

Offsets are int64 so N * d and V * d beyond 2**31 work. Tested on the CPU with TRITON_INTERPRET=1
(set before triton is imported).
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels' exponentials are exp2(z * LOG2E - shift)

@triton.jit
def _lse_tile(h_rows, w_ptr, b_ptr, v0, v_end, ml, s, D, stride_w, softcap,
              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              EVEN_K: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fold the tile of logits of columns [v0, v0 + BLOCK_N) into the running (ml, s), per row:
    ml = max(z) * log2(e) so far, s = sum(exp2(z * log2(e) - ml)). MASKED: the tile runs past v_end;
    its columns are clamped there (every load in bounds) and count as -inf. h_rows (BLOCK_M, 1): row
    start pointers of h (rows past N clamped to N - 1: computed, never stored)."""
    cols = v0 + tl.arange(0, BLOCK_N)
    if MASKED:
        col_ok = cols < v_end
        cols = tl.minimum(cols, v_end - 1)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # (BLOCK_N, 1)
    ks = tl.arange(0, BLOCK_K)
    # 1. z = h @ W.T for this tile, fp32 accumulation, never written to memory
    z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_rows + (k0 + ks)[None, :])
            w = tl.load(w_rows + (k0 + ks)[None, :])
        else:
            k_ok = (k0 + ks) < D
            h = tl.load(h_rows + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w_rows + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot multiplies bit patterns
            h, w = h.to(tl.float32), w.to(tl.float32)  # triton-lang/triton#11584
        z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols.to(tl.int64)).to(tl.float32)[None, :]
    if HAS_SOFTCAP:  # softcap * tanh(z / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    if MASKED:
        z = tl.where(col_ok[None, :], z, float("-inf"))
    # 2. online lse in base 2: s <- s * exp2(ml - ml_new) + sum(exp2(z * log2(e) - ml_new)); each exponent is
    #    one fma, not a subtract and a multiply
    ml_new = tl.maximum(ml, tl.max(z, axis=1) * LOG2E)
    s = s * tl.exp2(ml - ml_new) + tl.sum(tl.exp2(z * LOG2E - ml_new[:, None]), axis=1)
    return ml_new, s


@triton.jit
def _linear_lse_kernel(h_ptr, w_ptr, b_ptr, ml_ptr, s_ptr,
                       N, V, D, stride_h, stride_w, cols_per_split, n_splits, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_h  # (BLOCK_M, 1), in bounds
    ml = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max(z) * log2(e)
    s = tl.zeros((BLOCK_M,), tl.float32)  # running sum(exp2(z * log2(e) - ml))
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    v_full = v_start + (v_end - v_start) // BLOCK_N * BLOCK_N  # whole tiles end here
    for v0 in range(v_start, v_full, BLOCK_N):  # no column masks: the hot loop
        ml, s = _lse_tile(h_rows, w_ptr, b_ptr, v0, v_end, ml, s, D, stride_w, softcap,
                          HAS_BIAS, HAS_SOFTCAP, PRECISION, UPCAST, EVEN_K, False, BLOCK_M, BLOCK_N, BLOCK_K)
    if v_full < v_end:  # the last split's last tile, when BLOCK_N does not divide V
        ml, s = _lse_tile(h_rows, w_ptr, b_ptr, v_full, v_end, ml, s, D, stride_w, softcap,
                          HAS_BIAS, HAS_SOFTCAP, PRECISION, UPCAST, EVEN_K, True, BLOCK_M, BLOCK_N, BLOCK_K)
    out = rows.to(tl.int64) * n_splits + split  # lse of the slice = (ml + log2(s)) ln 2, taken in float64
    tl.store(ml_ptr + out, ml, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)


@triton.jit
def _target_logit_kernel(h_ptr, w_ptr, b_ptr, t_ptr, out_ptr, N, V, D, stride_h, stride_w, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = z[n, targets[n]] (softcapped), float32 products and sums; 0 where the target is outside
    [0, V) (ignored rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
    hit = row_ok & (target >= 0) & (target < V)
    t64 = tl.where(hit, target, 0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ok = hit[:, None] & ((k0 + ks) < D)[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + (k0 + ks)[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + t64[:, None] * stride_w + (k0 + ks)[None, :], mask=ok, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + t64, mask=hit, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:  # as the tiles cap it
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    tl.store(out_ptr + rows64, tl.where(hit, acc, 0.0), mask=row_ok)


# LOG2E as float32 holds it: what the kernels multiply a float32 by, so the host scales lse by the same
# number and the kernels' exponents (z - lse) * L stay exact
_LOG2E_F32 = float(torch.tensor(LOG2E.value, dtype=torch.float32))


def _fp32_precision(device) -> str:
    """tl.dot precision for float32 inputs: "tf32x3" (three tf32 products on the tensor cores,
    float32-level error: 1.8e-7 relative against float64 where "ieee" gave 5.2e-7) from Ampere on,
    else "ieee" (fp32 FMAs, 3.8x slower on an H200)."""
    return "tf32x3" if torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"


def default_precision(h2) -> str:
    """fp32 inputs: float32-level products like torch's default matmul (plain tf32 would lose 13
    bits); bf16/fp16 inputs: the tensor cores' native path ("tf32" is triton's default); the
    interpreter: "ieee"."""
    if not h2.is_cuda:
        return "ieee"
    return _fp32_precision(h2.device) if h2.dtype == torch.float32 else "tf32"


def default_config(h2, precision: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this input and tl.dot precision. Chosen
    with scripts/tune_triton.py on an H200 (N=8192, d=768, V=50257; it passes others as `config`): bf16
    256x128x64 ran 1.09x the 64x128x64 tiles (after the tile loop's rewrite, 2026-11-27: 1.13 ms, the fastest
    of 12, 256x128 at 4 stages 1.19 ms, 128x256 1.23 ms, 128x128 1.29 ms); float32 (tf32x3) 128x128x64 ran 5.8x the fp32-FMA
    64x128x32 tiles; where fp32 FMAs are the only way, 128x128x32 ran 1.5x 64x128x32."""
    if not h2.is_cuda:  # the interpreter: small tiles keep the CPU emulation quick
        return 16, 32, 16, 1, 1
    if h2.element_size() == 2:
        return 256, 128, 64, 8, 3
    if precision == "tf32x3":
        return 128, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def linear_lse_target(h2, weight, t1, bias=None, *, softcap=None, config=None, precision=None):
    """-> (lse (N,) float64, target_logit (N,) float32), for logits z = h2 @ weight.T + bias (softcapped).
    h2 (N, d) and weight (V, d) float32/bfloat16/float16 on CUDA (or CPU under TRITON_INTERPRET=1);
    t1 (N,) int64; ignored targets (outside [0, V)) give target_logit 0. precision: tl.dot's
    input_precision ("ieee", "tf32", "tf32x3"), default default_precision(h2); config: (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages), the blocks powers of 2 of at least 16, default
    default_config(h2, precision)."""
    if h2.dtype == torch.float64:
        raise TypeError("the Triton path has no float64 tl.dot; use impl='chunked' for float64")
    N, D = h2.shape
    V = weight.shape[0]
    h2, weight = h2.contiguous(), weight.contiguous()
    precision = default_precision(h2) if precision is None else precision
    block_m, block_n, block_k, warps, stages = default_config(h2, precision) if config is None else config
    if h2.is_cuda:
        n_programs_wanted = 4 * torch.cuda.get_device_properties(h2.device).multi_processor_count
    else:
        n_programs_wanted = 4
    row_blocks = triton.cdiv(N, block_m)
    n_col_blocks = triton.cdiv(V, block_n)
    n_splits = max(1, min(n_col_blocks, triton.cdiv(n_programs_wanted, row_blocks)))
    cols_per_split = triton.cdiv(n_col_blocks, n_splits) * block_n
    n_splits = triton.cdiv(V, cols_per_split)
    ml_parts = torch.empty(N, n_splits, dtype=torch.float32, device=h2.device)
    s_parts = torch.empty(N, n_splits, dtype=torch.float32, device=h2.device)
    bias_arg, cap = (bias if bias is not None else h2), (float(softcap) if softcap is not None else 1.0)
    _linear_lse_kernel[(row_blocks, n_splits)](
        h2, weight, bias_arg, ml_parts, s_parts, N, V, D, h2.stride(0), weight.stride(0), cols_per_split, n_splits, cap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION=precision, UPCAST=not h2.is_cuda, EVEN_K=D % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    target_logit = torch.empty(N, dtype=torch.float32, device=h2.device)
    target_rows = 32 if h2.is_cuda else 16
    target_k = min(128, triton.next_power_of_2(D)) if h2.is_cuda else 16
    _target_logit_kernel[(triton.cdiv(N, target_rows),)](
        h2, weight, bias_arg, t1, target_logit, N, V, D, h2.stride(0), weight.stride(0), cap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_R=target_rows, BLOCK_K=target_k,
        num_warps=4 if h2.is_cuda else 1)
    # each slice's shift ml is the value its exponents used, so only s's own rounding is left: lse in float64.
    # The tiles summed 2^(z L) = e^(z L ln 2) with L = log2(e) in float32, so the base-2 total is divided by L,
    # not multiplied by ln 2 (that would leave (L ln 2 - 1) * z ~ 1e-8 * z)
    base2 = ml_parts.double() + s_parts.double().log2()  # (N, SPLITS): log2 of each slice's sum of 2^(z L)
    lse = torch.logsumexp(base2 * math.log(2), dim=1) / (_LOG2E_F32 * math.log(2))
    return lse, target_logit


@triton.jit
def _dz_tile(h_rows, w_rows, b_ptr, t_ptr, lse_ptr, g_ptr, rows64, cols, row_ok, col_ok, D, softcap,
             HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             CLAMPED: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    """The (BLOCK_M, BLOCK_N) tile of dz in float32, for both backwards. h_rows (BLOCK_M, 1) and w_rows
    (BLOCK_N, 1): row start pointers of h and W; cols: the tile's vocabulary ids (targets compare to them);
    b_ptr + cols its bias entries. CLAMPED: the row pointers of rows past N and columns past V are clamped
    in bounds by the caller, so the loads need no row or column mask (EVEN_K: nor a k mask, BLOCK_K divides
    d); those rows and columns still come out 0."""
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    # 1. z = h @ W.T for this tile, exactly as the forward built it (fp32 accumulation)
    z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        if CLAMPED and EVEN_K:
            h = tl.load(h_rows + (k0 + ks)[None, :])
            w = tl.load(w_rows + (k0 + ks)[None, :])
        elif CLAMPED:
            h = tl.load(h_rows + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w_rows + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
        else:
            h = tl.load(h_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot multiplies bit patterns (triton-lang/triton#11584)
            h, w = h.to(tl.float32), w.to(tl.float32)
        z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:  # softcap * tanh(z / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1), as in the forward
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    # 2. dz = (softmax - onehot) * g in registers: softmax = exp2(z L - lse L), one fma and one exp2 (lse_ptr
    #    holds lse * L, L = log2(e) as float32 holds it: backward_inputs); the one-hot as a second fma,
    #    dz = p * g - (g at the target), the target compared as int32. g = 0 on ignored rows (and rows past
    #    N); the where also keeps an overflowing exp on such rows, or on columns past V, out of the sums.
    lse2 = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows64, mask=row_ok, other=0.0)
    target = tl.load(t_ptr + rows64, mask=row_ok, other=-1).to(tl.int32)  # [0, V); ignored rows have g = 0
    p = tl.exp2(z * LOG2E - lse2[:, None])
    dz = p * g[:, None] + tl.where(cols[None, :] == target[:, None], (-g)[:, None], 0.0)  # one select, one fma
    if HAS_SOFTCAP:  # chain rule through the cap: 1 - tanh^2, tanh = z / softcap
        dz *= 1.0 - (z / softcap) * (z / softcap)
    return tl.where((g != 0.0)[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _linear_ce_backward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                               N, V, D, stride_h, stride_w, softcap, group_m,
                               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_H: tl.constexpr,
                               WANT_W: tl.constexpr, WANT_B: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # 0. This program's tile. Within a group of group_m row blocks the row block runs fastest, so the
    #    programs on the GPU at one time share a few blocks of W (read once) and the group's h and dh
    #    stay in L2 while every vocabulary block passes by.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    per_group = group_m * tl.cdiv(V, BLOCK_N)
    first_m = (pid // per_group) * group_m
    size_m = tl.minimum(n_row_blocks - first_m, group_m)
    local = pid % per_group
    pid_m = first_m + local % size_m
    pid_n = local // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows64[:, None] * stride_h  # (BLOCK_M, 1) row starts
    w_rows = w_ptr + cols64[:, None] * stride_w  # (BLOCK_N, 1)
    # 1-2. the tile of logits as the forward built it, then dz, in registers
    dz = _dz_tile(h_rows, w_rows, b_ptr, t_ptr, lse_ptr, g_ptr, rows64, cols, row_ok, col_ok, D, softcap,
                  HAS_BIAS, HAS_SOFTCAP, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if WANT_B:
        tl.atomic_add(db_ptr + cols64, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    # 3. dh[rows] += dz @ W[cols] and dW[cols] += dz.T @ h[rows], BLOCK_K columns of d at a time; dz
    #    enters the products in the inputs' dtype (bf16 x bf16 -> fp32 on the tensor cores), as
    #    torch's own backward rounds the logits' gradient to the logits' dtype.
    dz_op = dz.to(h_ptr.dtype.element_ty)
    if UPCAST:
        dz_op = dz_op.to(tl.float32)
    dz_t = tl.trans(dz_op)  # (BLOCK_N, BLOCK_M)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < D
        if WANT_H:
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            tl.atomic_add(dh_ptr + rows64[:, None] * D + kk[None, :],
                          tl.dot(dz_op, w, input_precision=PRECISION),
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if WANT_W:
            h = tl.load(h_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            tl.atomic_add(dw_ptr + cols64[:, None] * D + kk[None, :],
                          tl.dot(dz_t, h, input_precision=PRECISION),
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


# Rows per group of the backward (see _linear_ce_backward_kernel, step 0): the group's h and float32 dh
# take at most this much of L2 (50 MiB on an H100 / H200), leaving the rest to W's and dW's blocks.
_GROUP_L2_BYTES = 24 << 20


def default_backward_config(h2, precision: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the backward. Compiled ahead of time for
    sm_90 with Triton 3.6 and 3.9 (ptxas, no GPU): bf16/fp16 128 x 128 x 64 tiles at 8 warps use 255
    registers a thread without spills (one program per SM), 128 KiB of shared memory at 2 stages, wgmma
    and 4-wide float32 reds; 128 x 256 and 256 x 128 tiles spill. float32 (tf32x3): 64 x 64 x 32 at 4
    warps, no spills. Timed on an H200 (bf16, N=8192, d=768, V=50257, scripts/bench_linear_nll.py
    --sweep-backward, 2026-11-27): 3 stages 7.86 ms, 2 stages 8.84 ms; 128 x 128 x 32: 8.62 ms; 64 x 128,
    128 x 64, 64 x 256 and 64 x 64 tiles 9.8-12.8 ms."""
    if not h2.is_cuda:  # the interpreter
        return 16, 32, 16, 1, 1
    if h2.element_size() == 2:
        return 128, 128, 64, 8, 3
    return 64, 64, 32, 4, 2


def backward_inputs(h2, weight, bias, lse, g, want_b):
    """The backward launchers' inputs as their kernels read them: h2 and weight contiguous, lse * log2(e)
    (log2(e) as float32 holds it, the product taken in float64) and g float32 contiguous, want_b only with
    a bias; TypeError for float64."""
    if h2.dtype == torch.float64:
        raise TypeError("the Triton path has no float64 tl.dot; use impl='chunked' for float64")
    lse2 = (lse.double() * _LOG2E_F32).float().contiguous()
    return h2.contiguous(), weight.contiguous(), lse2, g.float().contiguous(), want_b and bias is not None


def linear_backward(h2, weight, t1, bias, lse, g, *, softcap=None, want_h=True, want_w=True, want_b=False,
                    config=None, precision=None, group_rows=None):
    """-> (dh, dW, dbias), the gradients of sum(g * nll) for nll = lse - z[t1], z = h2 @ weight.T + bias
    (softcapped), without building z or dz: dz = (softmax(z) - onehot(t1)) * g, dh = dz @ weight,
    dW = dz.T @ h2, dbias = dz.sum(0), accumulated in float32 and returned in the inputs' dtypes (None
    where not wanted; dbias None without bias). h2 (N, d), weight (V, d), bias (V,) float32/bfloat16/
    float16; t1 (N,) int64; lse (N,) from linear_lse_target (float64; any float dtype is taken); g (N,)
    float32, 0.0 where the target is ignored. config and precision as in linear_lse_target (default
    default_backward_config); group_rows: rows per L2 group (default: what fits _GROUP_L2_BYTES)."""
    h2, weight, lse, g, want_b = backward_inputs(h2, weight, bias, lse, g, want_b)
    (N, D), V = h2.shape, weight.shape[0]
    precision = default_precision(h2) if precision is None else precision
    block_m, block_n, block_k, warps, stages = (default_backward_config(h2, precision) if config is None
                                                else config)
    n_row_blocks = triton.cdiv(N, block_m)
    if group_rows is None:
        group_rows = max(block_m, _GROUP_L2_BYTES // (D * (4 + h2.element_size())))
    n_groups = triton.cdiv(n_row_blocks, max(1, group_rows // block_m))
    group_m = triton.cdiv(n_row_blocks, n_groups)  # groups of equal size, the last one at most smaller
    dh = torch.zeros(N, D, dtype=torch.float32, device=h2.device) if want_h else None
    dw = torch.zeros(V, D, dtype=torch.float32, device=h2.device) if want_w else None
    db = torch.zeros(V, dtype=torch.float32, device=h2.device) if want_b else None
    grid = (n_row_blocks * triton.cdiv(V, block_n),)
    _linear_ce_backward_kernel[grid](
        h2, weight, bias if bias is not None else h2, t1, lse, g,
        dh if want_h else lse, dw if want_w else lse, db if want_b else lse,
        N, V, D, h2.stride(0), weight.stride(0), float(softcap) if softcap is not None else 1.0, group_m,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WANT_H=want_h, WANT_W=want_w,
        WANT_B=want_b, PRECISION=precision, UPCAST=not h2.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    cast = lambda acc, like: None if acc is None else acc.to(like.dtype)  # noqa: E731
    return cast(dh, h2), cast(dw, weight), cast(db, bias)
