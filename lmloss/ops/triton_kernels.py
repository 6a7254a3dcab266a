"""Triton kernels for CUDA tensors: one program per row, one read of the row per pass, fp32 math.

Forward reads each row once, keeping an online log-sum-exp over vocabulary blocks:
    lse = m + log(d),  d = sum_j exp(x_j - m),  m = running max;
    merging a block with max m_b:  m' = max(m, m_b),  d' = d * exp(m - m') + sum(exp(x_block - m'))
and writes nll = (m - x[t]) + log(d) and lse (float64, saved for backward). Backward reads the row once more and
writes grad = (exp(x - lse) - onehot(t)) * g in the logits' dtype; nothing N x V is saved.
Row offsets are int64, so N * V > 2**31 elements is fine.

Importing this module imports triton. On a CPU-only machine the kernels run under
TRITON_INTERPRET=1, which must be set before triton is first imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lmloss.ops._checks import compute_dtype

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _nll_lse_kernel(x_ptr, stride_xn, stride_xv, t_ptr, nll_ptr, lse_ptr, V, ignore_index,
                    BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn  # int64 offset: N * V may exceed 2**31
    # 1. Online log-sum-exp over vocabulary blocks. m_safe keeps an all -inf prefix (masked vocab)
    #    from making exp(-inf - -inf) = NaN; a +inf logit still gives NaN, like torch.
    m = tl.full((), float("-inf"), COMPUTE)
    d = tl.zeros((), COMPUTE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols * stride_xv, mask=cols < V, other=float("-inf")).to(COMPUTE)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    log_d = tl.log(d)
    # 2. The target's logit, one scalar load; nll = (m - x_t) + log d keeps float32's precision where
    #    (m + log d) - x_t would lose ulp(lse). Ignored rows score 0.0.
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    x_t = tl.load(x_row + tl.where(valid, t, 0) * stride_xv).to(COMPUTE)
    tl.store(nll_ptr + row, tl.where(valid, (m - x_t) + log_d, 0.0))
    # 3. lse in float64: m + log d is exact there, and backward splits it back into two floats.
    tl.store(lse_ptr + row, m.to(tl.float64) + log_d.to(tl.float64))


@triton.jit
def _grad_kernel(x_ptr, stride_xn, stride_xv, t_ptr, lse_ptr, g_ptr, out_ptr, stride_on, V,
                 BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    out_row = out_ptr + row * stride_on
    # lse = hi + lo as two floats: exp((x - hi) - lo) keeps float32's precision near the row max,
    # where exp(x - float32(lse)) would err by ulp(lse) (1.5e-5 relative at lse = 130).
    lse = tl.load(lse_ptr + row)  # float64
    hi = lse.to(COMPUTE)
    lo = (lse - hi.to(tl.float64)).to(COMPUTE)
    g = tl.load(g_ptr + row).to(COMPUTE)
    t = tl.load(t_ptr + row)  # outside [0, V): no one-hot
    # grad = (softmax - onehot) * g, softmax recomputed from the saved lse.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols * stride_xv, mask=mask, other=0.0).to(COMPUTE)
        grad = (tl.exp((x - hi) - lo) - tl.where(cols == t, 1.0, 0.0)) * g
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for both kernels: 4096-wide blocks keep registers in check; small V takes
    one block. BLOCK_V must be a power of 2. scripts/tune_triton.py times others, passed as `config`."""
    block = min(4096, triton.next_power_of_2(V))
    return block, (8 if block >= 2048 else 4)


def _check_device(logits: torch.Tensor) -> None:
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got logits on {logits.device}; use impl='chunked' "
            "(or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing triton to debug the kernel"
        )


def nll_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, config=None):
    """logits (N, V), targets (N,) int64 -> (nll (N,) float32 (float64 for float64 logits), lse (N,) float64).
    config: (BLOCK_V, num_warps), default default_config(V)."""
    _check_device(logits)
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    nll = torch.empty(N, dtype=cdt, device=logits.device)
    lse = torch.empty(N, dtype=torch.float64, device=logits.device)
    if N == 0:
        return nll, lse
    block, warps = default_config(V) if config is None else config
    _nll_lse_kernel[(N,)](logits, logits.stride(0), logits.stride(1), targets.contiguous(), nll, lse, V,
                          ignore_index, BLOCK_V=block, COMPUTE=_TL_DTYPES[cdt], num_warps=warps)
    return nll, lse


def grad_logits(logits, targets, lse, grad_nll, out, *, config=None):
    """out[i, j] = (exp(x[i, j] - lse[i]) - [j == targets[i]]) * grad_nll[i]; out (N, V) with unit column stride.
    config: (BLOCK_V, num_warps), default default_config(V)."""
    _check_device(logits)
    N, V = logits.shape
    if N == 0:
        return out
    cdt = compute_dtype(logits.dtype)
    block, warps = default_config(V) if config is None else config
    _grad_kernel[(N,)](logits, logits.stride(0), logits.stride(1), targets.contiguous(), lse.contiguous(),
                       grad_nll.contiguous(), out, out.stride(0), V,
                       BLOCK_V=block, COMPUTE=_TL_DTYPES[cdt], num_warps=warps)
    return out
