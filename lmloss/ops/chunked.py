"""Fast eager path for CPU (and CUDA without Triton): fused log-softmax over cache-sized row blocks.

F.cross_entropy on CPU writes a fresh (N, V) float32 log-probability tensor: at N=4096, V=50257 that
is 823 MB of allocation, page faults and writes before a single loss comes out. Here each block of
rows is read once from memory while torch's vectorized log_softmax kernel makes its passes over it
(max, sum of exp, write into a reused block buffer that stays in cache), so the extra memory is one
or two blocks plus O(N), and nothing is compiled. The backward writes softmax - onehot block by
block straight into the gradient tensor.

Threads: a parallel torch op on a 2 MB block pays an OpenMP fork/join each time, and on a loaded
machine that join waits for a descheduled thread (measured: 12 ms per block on 2 busy cores, 6x
slower than F.cross_entropy). So on CPU the rows are split into one contiguous range per intra-op
thread, and each range runs its block loop on a worker thread whose torch ops are single-threaded;
the ops release the GIL, so the ranges run in parallel with no per-block join. (torch.set_num_threads
in a worker also moves the process default, which _parallel_rows puts back before returning.)

Identities used:
    nll = -log_softmax(x)[t]
    lse = x[t] - log_softmax(x)[t]      (the row's log-sum-exp, for logsumexp() and z-losses)
    d nll / d x = softmax(x) - onehot(t)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from lmloss.ops._checks import compute_dtype

# A block of fp32 rows small enough to stay in L2 across log_softmax's passes, large enough that the
# Python loop costs little. On CUDA (no Triton) a block is about one big kernel launch instead.
_CPU_BLOCK_BYTES = 2 << 20
_CUDA_BLOCK_BYTES = 256 << 20

_pool: ThreadPoolExecutor | None = None  # worker threads for _parallel_rows, created on first use
_pool_workers = 0
_pool_lock = threading.Lock()


def _block_rows(logits: torch.Tensor, itemsize: int) -> int:
    budget = _CUDA_BLOCK_BYTES if logits.is_cuda else _CPU_BLOCK_BYTES
    return max(1, min(logits.shape[0], budget // (logits.shape[1] * itemsize)))


def _single_threaded(fn, start, end, inference):
    torch.set_num_threads(1)  # this worker thread's intra-op threads (OpenMP's setting is per thread)
    # Grad and inference mode are per thread: the caller's autograd.Function runs without grad, and
    # under the caller's torch.inference_mode() its buffers are inference tensors that only a thread
    # in inference mode may write (https://github.com/pytorch/rfcs/pull/17). This order, because
    # inference_mode(False) turns grad mode back on.
    with torch.inference_mode(inference), torch.no_grad():
        return fn(start, end)


def _parallel_rows(fn, n_rows: int, block_rows: int, device: torch.device) -> None:
    """Call fn(start, end) on contiguous row ranges, one per intra-op thread, concurrently on CPU."""
    global _pool, _pool_workers
    n_threads = torch.get_num_threads()
    n_ranges = min(n_threads, -(-n_rows // block_rows))
    if device.type != "cpu" or n_ranges <= 1:
        fn(0, n_rows)
        return
    step = -(-n_rows // n_ranges)
    ranges = [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]
    with _pool_lock:
        if _pool_workers < len(ranges):
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_workers = ThreadPoolExecutor(len(ranges), thread_name_prefix="lmloss-chunked"), len(ranges)
        pool = _pool
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(_single_threaded, fn, s, e, inference) for s, e in ranges]
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(n_threads)  # the workers' set_num_threads(1) also moved the process default


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

    _parallel_rows(rows, N, B, logits.device)
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

    _parallel_rows(rows, N, B, logits.device)
    return out
