"""Row ranges run concurrently on the CPU, one per intra-op thread, each with single-threaded torch ops.

Used by the chunked log-softmax (chunked.py) and the chunked fused linear forward (linear.py).
A parallel torch op on a small, cache-sized block pays an OpenMP fork/join each time, and on a loaded
machine that join waits for a descheduled thread (measured: 12 ms per 2 MB block on 2 busy cores, 6x
slower than F.cross_entropy). So the rows are split into one contiguous range per intra-op thread, and
each range runs its whole block loop on a worker thread whose torch ops are single-threaded; the ops
release the GIL, so the ranges run in parallel with no per-block join. (torch.set_num_threads in a
worker also moves the process default, which parallel_rows puts back before returning.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None  # worker threads for parallel_rows, created on first use
_pool_workers = 0
_pool_lock = threading.Lock()


def _single_threaded(fn, start, end, inference):
    torch.set_num_threads(1)  # this worker thread's intra-op threads (OpenMP's setting is per thread)
    # Grad and inference mode are per thread: the caller's autograd.Function runs without grad, and
    # under the caller's torch.inference_mode() its buffers are inference tensors that only a thread
    # in inference mode may write (https://github.com/pytorch/rfcs/pull/17). This order, because
    # inference_mode(False) turns grad mode back on.
    with torch.inference_mode(inference), torch.no_grad():
        return fn(start, end)


def parallel_rows(fn, n_rows: int, block_rows: int, device: torch.device) -> None:
    """Call fn(start, end) on contiguous row ranges covering [0, n_rows), one per intra-op thread,
    concurrently on the CPU; one call fn(0, n_rows) on any other device or when one range suffices."""
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
            _pool, _pool_workers = ThreadPoolExecutor(len(ranges), thread_name_prefix="lmloss-rows"), len(ranges)
        pool = _pool
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(_single_threaded, fn, s, e, inference) for s, e in ranges]
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(n_threads)  # the workers' set_num_threads(1) also moved the process default
