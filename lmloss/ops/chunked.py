"""Fast eager path for CPU (and CUDA without Triton): fused log-softmax over cache-sized row blocks.

F.cross_entropy on CPU writes a fresh (N, V) float32 log-probability tensor: at N=4096, V=50257 that
is 823 MB of allocation, page faults and writes before a single loss comes out. Here each block of
rows is read once from memory while torch's vectorized log_softmax kernel makes its passes over it
(max, sum of exp, write into a reused block buffer that stays in cache), so the extra memory is one
or two blocks plus O(N), and nothing is compiled. The backward writes softmax - onehot block by
block straight into the gradient tensor.

Threads: on CPU the rows are split into one contiguous range per intra-op thread, each run on a worker
thread with single-threaded torch ops (lmloss/ops/_threads.py says why: no fork/join per block).

Identities used:
    nll = -log_softmax(x)[t]
    lse = x[t] - log_softmax(x)[t]      (the row's log-sum-exp, for logsumexp() and z-losses)
    d nll / d x = softmax(x) - onehot(t)
"""

from __future__ import annotations

import torch

from lmloss.ops._checks import compute_dtype
from lmloss.ops._threads import parallel_rows

# A block of fp32 rows small enough to stay in L2 across log_softmax's passes, large enough that the
# Python loop costs little. On CUDA (no Triton) a block is about one big kernel launch instead.
_CPU_BLOCK_BYTES = 2 << 20
_CUDA_BLOCK_BYTES = 256 << 20


def _block_rows(logits: torch.Tensor, itemsize: int) -> int:
    budget = _CUDA_BLOCK_BYTES if logits.is_cuda else _CPU_BLOCK_BYTES
    return max(1, min(logits.shape[0], budget // (logits.shape[1] * itemsize)))


def nll_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """logits (N, V), targets (N,) int64 -> (nll (N,) float32 (float64 for float64 logits), lse (N,) float64).

    nll: the same numbers as F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="none").
    """
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    B = _block_rows(logits, torch.finfo(cdt).bits // 8)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1), column 0 stands in for ignored rows
    logp_t = torch.empty(N, dtype=cdt, device=logits.device)
    lse = torch.empty(N, dtype=torch.float64, device=logits.device)

    def rows(start, end):
        upcast = torch.empty(B, V, dtype=cdt, device=logits.device) if logits.dtype != cdt else None
        logp = torch.empty(B, V, dtype=cdt, device=logits.device)  # (B, V) reused for every block
        for s in range(start, end, B):
            e = min(s + B, end)
            x = logits[s:e] if upcast is None else upcast[: e - s].copy_(logits[s:e])  # (b, V), cdt
            lp = torch.log_softmax(x, dim=1, out=logp[: e - s])  # 1. the block's one fused pass
            logp_t[s:e] = lp.gather(1, tcol[s:e])[:, 0]  # 2. log p of the target column
            x_t = x.gather(1, tcol[s:e])[:, 0]
            torch.sub(x_t.double(), logp_t[s:e].double(), out=lse[s:e])  # 3. lse = x_t - logp_t

    parallel_rows(rows, N, B, logits.device)
    _fix_cancelled_lse(logits, logp_t, lse, B)
    return torch.where(valid, -logp_t, 0.0), lse


def _fix_cancelled_lse(logits, logp_t, lse, block_rows):
    """Recompute lse = logsumexp(x) where x_t - logp_t cancels: logp_t below -64 (the error would exceed
    ulp(64)), -inf or NaN. Rare for a model's targets; common only for random logits of large scale."""
    rows = (~(logp_t >= -64.0)).nonzero()[:, 0]
    for s in range(0, rows.numel(), block_rows):
        idx = rows[s:s + block_rows]
        lse[idx] = torch.logsumexp(logits[idx].to(logp_t.dtype), dim=1).double()


def grad_logits(logits, targets, lse, grad_nll, out):
    """out[i, j] = (softmax(x)[i, j] - [j == targets[i]]) * grad_nll[i], written block by block into out.

    No one-hot where targets[i] is outside [0, V). out is (N, V) in logits' dtype; a block is computed
    in float32 (float64 for float64 logits) and rounded once. `lse` is not read: torch's fused CPU
    softmax renormalizes a cache-resident block 2.3x faster than exp_(x - lse) (its exp is the
    faster one), so the normalizer is recomputed from the block instead.
    """
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    B = _block_rows(logits, torch.finfo(cdt).bits // 8)
    has_onehot = (targets >= 0) & (targets < V)
    tcol = torch.where(has_onehot, targets, 0)[:, None]  # (N, 1)
    minus_g = torch.where(has_onehot, -grad_nll, 0.0).to(cdt)[:, None]  # (N, 1); adding 0 is a no-op
    g = grad_nll.to(cdt)[:, None]  # (N, 1)

    def rows(start, end):
        upcast = torch.empty(B, V, dtype=cdt, device=logits.device) if logits.dtype != cdt else None
        buf = torch.empty(B, V, dtype=cdt, device=logits.device) if out.dtype != cdt else None
        for s in range(start, end, B):
            e = min(s + B, end)
            x = logits[s:e] if upcast is None else upcast[: e - s].copy_(logits[s:e])  # (b, V), cdt
            gb = out[s:e] if buf is None else buf[: e - s]
            torch.softmax(x, dim=1, out=gb)  # 1. softmax, one fused kernel
            gb.mul_(g[s:e]).scatter_add_(1, tcol[s:e], minus_g[s:e])  # 2. (softmax - onehot) * g
            if buf is not None:
                out[s:e].copy_(gb)  # 3. one rounding to logits' dtype

    parallel_rows(rows, N, B, logits.device)
    return out
