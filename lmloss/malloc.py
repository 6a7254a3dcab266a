"""Keep freed memory mapped in lmloss's own command processes (glibc): what `lmloss eval` and the
other commands set up before they load a model. Importing lmloss changes nothing in a user's process.

glibc hands every allocation above its mmap threshold (128 KiB at start, rising to at most 32 MiB as
such blocks are freed) straight to mmap, and unmaps it on free; trimming also returns the heap's free
top to the kernel. The next allocation of that size is then fresh memory that the kernel faults in and
zeroes, page by page. A CPU forward pass allocates and frees tens of MB of activations per layer, so
an evaluation pays that again on every batch. keep_freed_memory() is the same as starting the process
with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment:
    mallopt(M_MMAP_MAX, 0)                  no mmap'ed blocks: big ones come from the heap, as small ones do
    mallopt(M_TRIM_THRESHOLD, INT_MAX)      a freed heap top is kept for the next allocation, not returned
Measured (scripts/bench_eval.py's lmloss worker, SmolLM2-135M, 8 WikiText pages, 2-core AMD EPYC with
AVX2, two runs each way, alternating): 266.4 / 254.9 tokens/s kept against 250.0 / 232.6 tokens/s with
glibc's defaults, the same log-likelihoods to the last digit, peak RSS 1191-1193 against 1137-1167 MiB.
The process's resident memory then stays near its peak until it exits, which is what a command wants.

Left as it is: another C library (musl, macOS), a process whose environment already sets one of
glibc's MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ (the user chose), or
LMLOSS_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory", "mode"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_GLIBC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_MODES = ("keep", "default")

_mode = "default"


def mode() -> str:
    """What this process's allocator does: "keep" after keep_freed_memory() took effect, else
    "default" with the reason in parentheses where keep_freed_memory() left it alone."""
    return _mode


def keep_freed_memory() -> str:
    """mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, INT_MAX) in this process; -> mode().
    LMLOSS_MALLOC: "keep" (the default) or "default" (leave glibc's settings alone)."""
    global _mode
    wanted = os.environ.get("LMLOSS_MALLOC", "keep").strip().lower() or "keep"
    if wanted not in _MODES:
        raise ValueError(f"LMLOSS_MALLOC={os.environ['LMLOSS_MALLOC']!r}: expected one of {', '.join(_MODES)} "
                         "(keep: freed memory stays mapped for the next batch; default: glibc's own settings)")
    chosen = [v for v in _GLIBC_VARIABLES if v in os.environ]
    if wanted == "default":
        _mode = "default (LMLOSS_MALLOC=default)"
    elif chosen:
        _mode = f"default ({chosen[0]} is set in the environment)"
    elif platform.libc_ver()[0] != "glibc":
        _mode = "default (not glibc)"
    else:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
        _mode = "keep" if ok else "default (mallopt refused)"
    return _mode
