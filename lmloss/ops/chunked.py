"""Fast eager path for CPU (and CUDA without Triton): per-token NLL over cache-sized row blocks.

F.cross_entropy on CPU writes a fresh (N, V) float32 log-probability tensor: at N=4096, V=50257 that
is 823 MB of allocation, page faults and writes before a single loss comes out. Here each block of
rows is read once from memory into a reused block buffer that stays in cache, so the extra memory is
one block per thread plus O(N), and nothing is compiled. The backward writes softmax - onehot block
by block straight into the gradient tensor (first asking for 2 MiB pages: _threads.advise_huge_pages).

Passes over a block (torch's CPU kernels; only the first reads memory, the rest find it in cache):
    forward   y = x * log2(e) - x_t * log2(e) (one fma, into the buffer); exp2 in place; row sums
              -- shifted by the target logit, not the max, so no max pass; exp2 is ~2x torch's exp
    backward  y = x * log2(e) - lse * log2(e) (one fma, into the gradient); exp2 in place; row sums;
              minus the one-hot; times g / sum -- shifted by the forward's lse, so no max pass
A bfloat16/float16 block is first upcast into the block buffer and then worked on in place.

Threads: on CPU the rows are split into ranges taken in turn by one worker per intra-op thread, each
running single-threaded torch ops (lmloss/ops/_threads.py says why: no fork/join per block, and a
worker on a busy core takes fewer ranges).

Identities used:
    nll = lse - x[t],  lse = log(sum(exp(x)))   (lse is saved: the backward's shift)
    d nll / d x = softmax(x) - onehot(t)
"""

from __future__ import annotations

import math

import torch

from lmloss.ops._checks import compute_dtype
from lmloss.ops._threads import advise_huge_pages, parallel_rows

# A block of compute-dtype rows small enough that the passes after the first find it in cache (L2/L3),
# large enough that the per-block Python and GIL cost stays small: on the 2-core AVX2 dev VM (512 KiB
# L2 per core, 32 MiB L3) 1-2 MiB ran best (one thread, 512 x 50257 fp32, paired against torch.compile:
# 200 KiB 0.90x, 400 KiB 0.95x, 1 MiB 1.04x, 2 MiB 1.13x, 4 MiB 0.98x). On CUDA (no Triton) a block is
# about one big kernel launch instead.
_CPU_BLOCK_BYTES = 2 << 20
_CUDA_BLOCK_BYTES = 256 << 20
_CPU_RANGES_PER_THREAD = 4  # ranges per worker, taken in turn: a worker on a busy core does fewer


def _block_rows(logits: torch.Tensor, itemsize: int) -> int:
    budget = _CUDA_BLOCK_BYTES if logits.is_cuda else _CPU_BLOCK_BYTES
    return max(1, min(logits.shape[0], budget // (logits.shape[1] * itemsize)))


def _run(rows, N, B, device):
    parallel_rows(rows, N, B, device, ranges_per_thread=_CPU_RANGES_PER_THREAD)


def nll_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, row_sums=None):
    """logits (N, V), targets (N,) int64 -> (nll (N,) float32 (float64 for float64 logits), lse (N,) float64).

    nll: the same numbers as F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="none").
    Each row is shifted by its own target logit instead of its max, so a block costs three passes and
    one read from memory, with exp2 (torch's is about twice as fast as its exp):
        c = -fl(x_t * L)                   L = log2(e) as the compute dtype holds it
        s = sum(exp2(fl(x * L + c)))       >= 1: the target's own term is 2^(c + x_t L) ~ 1
        nll = ln(s) - (c + x_t L) ln(2),  lse = x_t + nll
    2^(x L + c) = e^(x - x_t) 2^(c + x_t L) e^((x - x_t)(L ln 2 - 1)): the residual c + x_t L is exact in
    float64, so the only shift error left is (x - x_t) * 1e-8 (L's rounding), never x * 1e-8.
    A row where some logit exceeds its target's by more than ~88 nats overflows s; those rows (s not
    finite: also NaN or inf logits) are redone by torch's log_softmax, max-shifted (_exact_rows).
    row_sums(logits, c, L) -> (N, 1) s, when given, replaces the block passes (impl "native": one C loop per row).
    """
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    B = _block_rows(logits, torch.finfo(cdt).bits // 8)
    L = _log2e(cdt)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1), column 0 stands in for ignored rows
    x_t = logits.gather(1, tcol).to(cdt)  # (N, 1), exact
    c = x_t * -L  # (N, 1), rounded once to cdt
    sums = row_sums(logits, c, L) if row_sums is not None else _row_sums(logits, c, L, cdt, B)
    x_t64 = x_t[:, 0].double()
    # 4. nll = ln(s) - (c + x_t L) ln 2: c + x_t L is the shift's rounding residual, exact in float64
    nll = sums[:, 0].double().log_() - (c[:, 0].double() + x_t64 * L) * math.log(2)
    lse = x_t64 + nll
    redo = (~torch.isfinite(sums[:, 0])).nonzero()[:, 0]
    if redo.numel():
        lse[redo] = _exact_rows(logits, redo, tcol[redo], cdt, B)
        nll[redo] = lse[redo] - x_t64[redo]
    return torch.where(valid, nll, 0.0).to(cdt), lse


def _row_sums(logits, c, L, cdt, B):
    """(N, 1) sum(exp2(x * L + c)) per row in cdt, block by block (steps 1-3 of nll_lse)."""
    N, V = logits.shape
    sums = torch.empty(N, 1, dtype=cdt, device=logits.device)
    upcast = logits.dtype != cdt

    def rows(start, end):
        buf = torch.empty(B, V, dtype=cdt, device=logits.device)  # (B, V) reused for every block
        for s in range(start, end, B):
            e = min(s + B, end)
            if upcast:  # bfloat16/float16: one upcast into the buffer, then in place
                y = torch.add(c[s:e], buf[: e - s].copy_(logits[s:e]), alpha=L, out=buf[: e - s])
            else:
                y = torch.add(c[s:e], logits[s:e], alpha=L, out=buf[: e - s])  # 1. y = x * L + c, one fma
            torch.sum(y.exp2_(), dim=1, keepdim=True, out=sums[s:e])  # 2. exp2 in place, 3. row sums

    _run(rows, N, B, logits.device)
    return sums


def _log2e(dtype: torch.dtype) -> float:
    """log2(e) rounded to dtype: the factor torch.add(..., alpha=) multiplies by in that dtype."""
    return torch.tensor(1 / math.log(2), dtype=torch.float64).to(dtype).item()


def _exact_rows(logits, rows, tcol, cdt, block_rows):
    """lse of logits[rows] as x_t - log_softmax(x)[t], max-shifted, in cdt (as F.cross_entropy: NaN for a row
    holding NaN or +inf); torch.logsumexp where that subtraction cancels: log p_t below -64 (the error would
    exceed ulp(64)), -inf or NaN."""
    lse = torch.empty(rows.numel(), dtype=torch.float64, device=logits.device)
    for s in range(0, rows.numel(), block_rows):
        x = logits[rows[s:s + block_rows]].to(cdt)  # (b, V)
        t = tcol[s:s + block_rows]
        logp_t = torch.log_softmax(x, dim=1).gather(1, t)[:, 0]
        lse_b = x.gather(1, t)[:, 0].double() - logp_t.double()
        cancelled = ~(logp_t >= -64.0)
        lse_b[cancelled] = torch.logsumexp(x[cancelled], dim=1).double()
        lse[s:s + block_rows] = lse_b
    return lse


def grad_logits(logits, targets, lse, grad_nll, out):
    """out[i, j] = (softmax(x)[i, j] - [j == targets[i]]) * grad_nll[i], written block by block into out.

    No one-hot where targets[i] is outside [0, V). out is (N, V) in logits' dtype; a block is computed
    in float32 (float64 for float64 logits) and rounded once. The forward's lse is only the shift that
    keeps exp2 in range, so no max pass; each row is renormalized by its own sum, as a softmax is:
        y = exp2(fl(x * L + c))      c = fl(-lse * L), L = log2(e) as the compute dtype holds it
        s = sum(y)                   ~1; the largest terms have y ~ 1, so their rounding is ulp(1)
        out = (y - s * onehot) * (g / s)
    Using lse itself as the normalizer would carry the forward's error (its target-shifted terms round
    at ulp((x_max - x_t) * L), ~5e-6 relative at a 60-nat loss) into every gradient. A row with NaN or
    +inf logits (lse NaN or inf) comes out NaN, as torch's softmax gives.
    """
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    B = _block_rows(logits, torch.finfo(cdt).bits // 8)
    L = _log2e(cdt)
    has_onehot = (targets >= 0) & (targets < V)
    tcol = torch.where(has_onehot, targets, 0)[:, None]  # (N, 1)
    minus_onehot = has_onehot.to(cdt).neg_()[:, None]  # (N, 1): -1, or 0 (adding 0 is a no-op)
    c = (lse.double() * -L).to(cdt)[:, None]  # (N, 1)
    g = grad_nll.to(cdt)[:, None]  # (N, 1)
    upcast = logits.dtype != cdt or out.dtype != cdt  # a block buffer holds the upcast and the softmax
    advise_huge_pages(out)  # out is usually fresh memory: fault it in 2 MiB pages, not 4 KiB ones

    def rows(start, end):
        buf = torch.empty(B, V, dtype=cdt, device=logits.device) if upcast else None
        s_b = torch.empty(B, 1, dtype=cdt, device=logits.device)
        k_b = torch.empty(B, 1, dtype=cdt, device=logits.device)
        for s in range(start, end, B):
            e = min(s + B, end)
            n = e - s
            if upcast:
                y = torch.add(c[s:e], buf[:n].copy_(logits[s:e]), alpha=L, out=buf[:n])
            else:
                y = torch.add(c[s:e], logits[s:e], alpha=L, out=out[s:e])  # 1. y = x * L + c, one fma
            y.exp2_()  # 2. exp2 in place
            sb = torch.sum(y, dim=1, keepdim=True, out=s_b[:n])  # 3. row sums
            kb = torch.div(g[s:e], sb, out=k_b[:n])  # g / s
            y.scatter_add_(1, tcol[s:e], sb.mul_(minus_onehot[s:e]))  # 4. minus s at the target
            y.mul_(kb)  # 5. times g / s
            if upcast:
                out[s:e].copy_(y)  # 6. rounded once to out's dtype (a fused mul into bfloat16 is 1.6x slower)

    _run(rows, N, B, logits.device)
    return out
