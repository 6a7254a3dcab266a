"""Row ranges run concurrently on the CPU, one worker per intra-op thread, each with single-threaded torch ops;
and the huge-page hint for large CPU outputs.

Used by the chunked log-softmax (chunked.py), the chunked fused linear forward (linear.py) and the
chunked statistics (stats.py, kl.py, linear_stats.py).
A parallel torch op on a small, cache-sized block pays an OpenMP fork/join each time, and on a loaded
machine that join waits for a descheduled thread (measured: 12 ms per 2 MB block on 2 busy cores, 6x
slower than F.cross_entropy). So the rows are split into contiguous ranges, and one worker thread per
intra-op thread runs whole ranges with single-threaded torch ops; the ops release the GIL, so the
workers run in parallel with no per-block join. (torch.set_num_threads in a worker also moves the
process default, which parallel_rows puts back before returning.)

With ranges_per_thread > 1 the ranges are smaller than one thread's share and each worker takes the
next one when it finishes its last: a worker whose core is shared with another process does less of
the work instead of holding up the end (OpenMP's static split, and torch.compile's, cannot do that).
"""

from __future__ import annotations

import collections
import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None  # worker threads for parallel_rows, created on first use
_pool_workers = 0
_pool_lock = threading.Lock()


def _single_threaded(fn, todo: collections.deque, inference):
    torch.set_num_threads(1)  # this worker thread's intra-op threads (OpenMP's setting is per thread)
    # Grad and inference mode are per thread: the caller's autograd.Function runs without grad, and
    # under the caller's torch.inference_mode() its buffers are inference tensors that only a thread
    # in inference mode may write (https://github.com/pytorch/rfcs/pull/17). This order, because
    # inference_mode(False) turns grad mode back on.
    with torch.inference_mode(inference), torch.no_grad():
        while True:
            try:
                start, end = todo.popleft()  # deque.popleft is atomic: each range goes to one worker
            except IndexError:
                return
            fn(start, end)


def parallel_rows(fn, n_rows: int, block_rows: int, device: torch.device, *, ranges_per_thread: int = 1) -> None:
    """Call fn(start, end) on contiguous row ranges covering [0, n_rows), concurrently on the CPU, from one
    worker per intra-op thread; each range is ~n_rows / (threads * ranges_per_thread) rows, at least
    block_rows, and each worker takes the next range when free. One call fn(0, n_rows) on any other
    device or when one range suffices."""
    global _pool, _pool_workers
    n_threads = torch.get_num_threads()
    n_ranges = min(n_threads * ranges_per_thread, -(-n_rows // block_rows))
    if device.type != "cpu" or n_ranges <= 1 or n_threads <= 1:
        fn(0, n_rows)
        return
    step = -(-n_rows // n_ranges)
    todo = collections.deque((s, min(s + step, n_rows)) for s in range(0, n_rows, step))
    n_workers = min(n_threads, len(todo))
    with _pool_lock:
        if _pool_workers < n_workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_workers = ThreadPoolExecutor(n_workers, thread_name_prefix="lmloss-rows"), n_workers
        pool = _pool
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(_single_threaded, fn, todo, inference) for _ in range(n_workers)]
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(n_threads)  # the workers' set_num_threads(1) also moved the process default


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <linux/mman.h>
_madvise = None


def advise_huge_pages(t: torch.Tensor) -> None:
    """Hint Linux to back the not-yet-written CPU tensor t with 2 MiB pages: madvise(MADV_HUGEPAGE) on the
    2 MiB-aligned part of its memory. Content and semantics are untouched; only the first write is cheaper.

    A fresh (N, V) gradient is mmap'ed memory, and first-touching it one 4 KiB page fault at a time costs
    more than computing it: on this project's 2-core AVX2 VM (transparent_hugepage=madvise), writing
    206 MB of new float32 took 617 ms with 4 KiB pages and 140 ms with this hint, against 106 ms to
    rewrite memory already mapped. (torch's allocator does the same when THP_MEM_ALLOC_ENABLE=1 is set.)
    No-op off Linux, for non-contiguous tensors or ones under 8 MiB, or when the call fails.
    """
    global _madvise
    n_bytes = t.numel() * t.element_size()
    if (t.device.type != "cpu" or not t.is_contiguous() or not sys.platform.startswith("linux")
            or n_bytes < 4 * _HUGE_PAGE):
        return
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + n_bytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal (old kernel, THP off) leaves 4 KiB pages
