"""Triton kernel for token_kl (see lmloss/ops/kl.py for the contract): ROWS rows per program, both
rows read once, online over BLOCK_V-wide vocabulary blocks, element math in float32.

Why not a / s_r + log(s / s_r) in float32: both terms are ~|E_p[d]| and their difference, the KL,
can be 1e-6 of that; exp() rounds s and s_r independently, so the float32 result keeps no digit.
Instead every sum below is of terms that are already small where the KL is small. Per element,
with running shifts M_r, M (the running maxima) and
    e = exp(zr - M_r),  q = exp(z - M),  nu = (z - M) - (zr - M_r),  psi(x) = exp(x) - 1 - x >= 0
the row keeps four sums (float64 per row, float32 within a block):
    S_r = sum e,  B = sum (q - e) = sum e * expm1(nu),  A = sum e * nu,  C = B - A = sum e * psi(nu)
and, with beta = B / S_r (so s / s_r = 1 + beta):
    KL = C / S_r + (log1p(beta) - beta)    near (|beta| <= 1/2): C's terms are >= 0, no cancellation
    KL = -A / S_r + log1p(beta)            far: A and log1p(beta) are both of the size of the KL
Near nu = 0, psi is its Taylor series x^2/2 (1 + x/3 (1 + x/4 (...))) and q - e is e * (psi + nu);
for |nu| > 1/2 the plain q - e and q - e - e * nu lose at most a few ulps. e = 0 (masked reference
logit) adds 0 to A and C's e-terms, so -inf - -inf = NaN never reaches a sum (q - e still counts).
Merging a block that raises the shifts: with a = exp(M_r - M_r'), g = exp(M - M'), and
Delta = (M_r' - M') - (M_r - M) the change of nu (float64 scalars, per row and block):
    S_r' = a S_r,  B' = g B + (g - a) S_r,  A' = a (A + Delta S_r),
    C' = a C + (g - a) B + (g - a - a Delta) S_r
An all -inf prefix keeps the shift at -1e30, so a = 0 rather than exp(-inf + inf) = NaN later.
Argmax: tl.max's first index per block, replaced only by a strictly larger later block.
Tested on the CPU with TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lmloss.ops._checks import compute_dtype

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# Terms of psi's series: float32 needs x^9 for |x| <= 1/2 (next term 2e-9 relative), float64 x^17.
_PSI_TERMS = {torch.float32: 9, torch.float64: 17}


@triton.jit
def _kl_kernel(zr_ptr, stride_rn, stride_rv, z_ptr, stride_n, stride_v, t_ptr,
               kl_ptr, nll_r_ptr, nll_ptr, amax_r_ptr, amax_ptr, N, V, ignore_index,
               HAS_TARGETS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
               COMPUTE: tl.constexpr, PSI_TERMS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # int64 offsets: N * V may exceed 2**31
    zr_rows = zr_ptr + rows64[:, None] * stride_rn
    z_rows = z_ptr + rows64[:, None] * stride_n
    m_r = tl.full((ROWS,), float("-inf"), COMPUTE)  # running maxima, exact logits
    m = tl.full((ROWS,), float("-inf"), COMPUTE)
    i_r = tl.zeros((ROWS,), tl.int32)  # running argmaxes
    i_m = tl.zeros((ROWS,), tl.int32)
    s_r = tl.zeros((ROWS,), tl.float64)
    b_sum = tl.zeros((ROWS,), tl.float64)
    a_sum = tl.zeros((ROWS,), tl.float64)
    c_sum = tl.zeros((ROWS,), tl.float64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < V)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        zr = tl.load(zr_rows + cols64 * stride_rv, mask=mask, other=float("-inf")).to(COMPUTE)
        z = tl.load(z_rows + cols64 * stride_v, mask=mask, other=float("-inf")).to(COMPUTE)
        # 1. block maxima and first indices; a later block wins only if strictly larger
        bm_r, bi_r = tl.max(zr, axis=1, return_indices=True, return_indices_tie_break_left=True)
        bm, bi = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        i_r = tl.where(bm_r > m_r, bi_r + start, i_r)
        i_m = tl.where(bm > m, bi + start, i_m)
        # 2. new shifts (floored at -1e30 while the row is all -inf) and the float64 rescale of the sums
        old_r = tl.maximum(m_r, -1e30).to(tl.float64)
        old = tl.maximum(m, -1e30).to(tl.float64)
        m_r = tl.maximum(m_r, bm_r)
        m = tl.maximum(m, bm)
        new_r = tl.maximum(m_r, -1e30)
        new = tl.maximum(m, -1e30)
        alpha = tl.exp(old_r - new_r.to(tl.float64))
        gamma = tl.exp(old - new.to(tl.float64))
        delta = (new_r.to(tl.float64) - new.to(tl.float64)) - (old_r - old)
        c_sum = alpha * c_sum + (gamma - alpha) * b_sum + (gamma - alpha - alpha * delta) * s_r
        b_sum = gamma * b_sum + (gamma - alpha) * s_r
        a_sum = alpha * (a_sum + delta * s_r)
        s_r = alpha * s_r
        # 3. the block's terms (module docstring); masked lanes: e = q = 0, nu = NaN -> all 0
        lr = zr - new_r[:, None]
        lm = z - new[:, None]
        e = tl.exp(lr)
        q = tl.exp(lm)
        nu = lm - lr
        en = tl.where(e > 0, e * nu, 0.0)
        t = tl.full(nu.shape, 1.0, COMPUTE)
        for k in tl.static_range(PSI_TERMS, 2, -1):  # psi(x) = x^2/2 (1 + x/3 (1 + x/4 (...)))
            t = 1.0 + nu * t * (1.0 / k)  # 1/k folds to a constant: no division per element
        e_psi = e * (0.5 * nu * nu * t)
        near = tl.abs(nu) <= 0.5
        c = tl.where(near, e_psi, q - e - en)
        b = tl.where(near, e_psi + en, q - e)
        s_r += tl.sum(e, axis=1).to(tl.float64)
        b_sum += tl.sum(b, axis=1).to(tl.float64)
        a_sum += tl.sum(en, axis=1).to(tl.float64)
        c_sum += tl.sum(c, axis=1).to(tl.float64)
    # 4. KL from the near or the far form, clamped at 0; NaN unless both maxima are finite
    beta = b_sum / s_r
    log1p_beta = tl.log(1.0 + beta)
    kl = tl.where(tl.abs(beta) <= 0.5, c_sum / s_r + (log1p_beta - beta), log1p_beta - a_sum / s_r)
    kl = tl.where(kl < 0, 0.0, kl)
    finite = (m_r > float("-inf")) & (m_r < float("inf")) & (m > float("-inf")) & (m < float("inf"))
    kl = tl.where(finite, kl, float("nan"))
    tl.store(kl_ptr + rows64, kl, mask=row_ok)
    tl.store(amax_r_ptr + rows64, i_r, mask=row_ok)
    tl.store(amax_ptr + rows64, i_m, mask=row_ok)
    # 5. nll = (max - z[t]) + log(s), the target logits by one scalar load each; s = S_r + B
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + rows64, mask=row_ok, other=ignore_index)
        valid = tgt != ignore_index
        tcol = tl.where(valid, tgt, 0)
        zr_t = tl.load(zr_ptr + rows64 * stride_rn + tcol * stride_rv, mask=row_ok, other=0.0).to(tl.float64)
        z_t = tl.load(z_ptr + rows64 * stride_n + tcol * stride_v, mask=row_ok, other=0.0).to(tl.float64)
        nll_r = (m_r.to(tl.float64) - zr_t) + tl.log(s_r)
        nll = (m.to(tl.float64) - z_t) + tl.log(s_r + b_sum)
        tl.store(nll_r_ptr + rows64, tl.where(valid, nll_r, 0.0), mask=row_ok)
        tl.store(nll_ptr + rows64, tl.where(valid, nll, 0.0), mask=row_ok)
    else:
        tl.store(nll_r_ptr + rows64, tl.zeros((ROWS,), tl.float64), mask=row_ok)
        tl.store(nll_ptr + rows64, tl.zeros((ROWS,), tl.float64), mask=row_ok)


def default_config(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, ROWS, num_warps): 2048-wide blocks and 4 warps (each element keeps ~10 float32 values
    live); small vocabularies take one block and several rows per program. BLOCK_V and ROWS are powers
    of 2. On an H200 at 4096 x 50257, (2048, 1, 4) took 0.70 ms, (1024, 1, 4) 0.79, (4096, 1, 8) 0.79,
    (2048, 1, 8) 0.84: the kernel is bound by its arithmetic there, not by memory."""
    block = min(2048, triton.next_power_of_2(V))
    rows = max(1, min(16, 2048 // block))
    return block, rows, 4


def token_kl(ref: torch.Tensor, logits: torch.Tensor, targets, ignore_index: int, *, config=None):
    """ref, logits (N, V), targets (N,) int64 or None -> (kl, nll_ref, nll (N,) float32 (float64 if an
    input is float64), argmax_ref, argmax (N,) int64). config: (BLOCK_V, ROWS, num_warps), default
    default_config(V)."""
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got logits on {logits.device}; use impl='chunked' "
            "(or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing triton to debug the kernel"
        )
    N, V = logits.shape
    cdt = compute_dtype(torch.promote_types(ref.dtype, logits.dtype))
    dev = logits.device
    kl, nll_ref, nll = (torch.empty(N, dtype=cdt, device=dev) for _ in range(3))
    argmax_ref, argmax = (torch.empty(N, dtype=torch.int64, device=dev) for _ in range(2))
    if N == 0:
        return kl, nll_ref, nll, argmax_ref, argmax
    block, rows, warps = default_config(V) if config is None else config
    t = targets.contiguous() if targets is not None else argmax  # never read without targets
    _kl_kernel[(triton.cdiv(N, rows),)](
        ref, ref.stride(0), ref.stride(1), logits, logits.stride(0), logits.stride(1), t,
        kl, nll_ref, nll, argmax_ref, argmax, N, V, ignore_index,
        HAS_TARGETS=targets is not None, ROWS=rows, BLOCK_V=block, COMPUTE=_TL_DTYPES[cdt],
        PSI_TERMS=_PSI_TERMS[cdt], num_warps=warps)
    return kl, nll_ref, nll, argmax_ref, argmax
