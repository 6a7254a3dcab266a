"""impl="native": token_nll's CPU forward and backward as one C loop per row (native_cpu.c), built once per machine.

    nll = logsumexp(x.float(), 1) - x.float().gather(1, t[:, None])[:, 0]        (what it computes)

The eager path (chunked.py) spends four or five torch passes over each cache-sized block: upcast, fma,
exp2, sum (and a scale in the backward). A generated loop does them in registers in one read of the row, which
is what torch.compile's code does; here that loop is plain C, compiled with the machine's C compiler the
first time it is asked for (about a second), kept under $LMLOSS_CACHE_DIR/native/, keyed by the source, the
compiler, the flags and the CPU's feature flags, and loaded with ctypes. Nothing is compiled per process.

"auto" on the CPU is this when it builds and loads, else "chunked" (same contract, eager torch ops):
`LMLOSS_NATIVE=0` turns it off; `native.status()` says which and why. impl="native" by name raises when the
library cannot be built (no C compiler, an unsupported one, an unwritable cache and temp folder).

The same library holds the softmax of the CPU causal attention (causal_probs, used by cpu_attention.py).

Numbers: the same formulas as chunked.nll_lse / chunked.grad_logits (target-shifted exp2 forward, lse-shifted
renormalized backward, float64 where it matters) with the row sums accumulated in float32 lanes over 512
columns and in float64 across them; rows whose sum overflows (a logit more than ~87 nats above the target's) or
holds NaN/inf are redone by the same exact fallback. float64 logits and non-contiguous rows go to "chunked".
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lmloss.ops import chunked
from lmloss.ops._checks import compute_dtype
from lmloss.ops._threads import advise_huge_pages, parallel_rows

_SOURCE = Path(__file__).with_name("native_cpu.c")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_RANGE_ROWS = 4  # rows per worker range at least: one ctypes call each
_RANGES_PER_THREAD = 4

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the library is not available, once a build was tried


def status() -> tuple[bool, str]:
    """(available, a line saying which library was loaded, or why none was)."""
    lib = _library()
    return (lib is not None, _reason if lib is None else f"loaded {lib._name}")


def available() -> bool:
    return _library() is not None


def _library() -> ctypes.CDLL | None:
    global _lib, _reason
    with _lock:
        if _lib is None and _reason is None:
            try:
                path = _build()
                try:
                    _lib = _load(path)
                except (OSError, AttributeError):  # a damaged file in the cache (a full disk, a killed writer): build it again
                    path.unlink(missing_ok=True)
                    _lib = _load(_build())
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                _reason = str(e)
        return _lib


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"impl='native' is not available here: {_reason}; use impl='chunked' (eager torch), "
                           "or install a C compiler (gcc or clang, or set CC)")
    return lib


def _compiler() -> str:
    if os.environ.get("LMLOSS_NATIVE", "1") == "0":
        raise RuntimeError("LMLOSS_NATIVE=0 turns the native CPU kernels off")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    return cc


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native must not be loaded on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build() -> Path:
    """The compiled library's path, compiling it first when the cache lacks it (written atomically)."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, *_FLAGS, _cpu_flags()]).encode()).hexdigest()
    from lmloss.cache_folder import cache_root

    for folder in (cache_root() / "native", Path(tempfile.gettempdir()) / f"lmloss-native-{os.getuid()}"):
        path = folder / f"native_cpu-{key[:20]}.so"
        if path.exists():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} could not compile {_SOURCE.name} (exit status {done.returncode}): "
                                   f"{done.stderr.strip()[-2000:] or 'no message'}")
            os.replace(tmp, path)  # another process may have written the same file: same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    raise RuntimeError(f"no writable folder for the compiled library (tried {cache_root() / 'native'} and the temp folder)")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL: worker threads run the rows in parallel
    i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.lmloss_row_sums.argtypes = [vp, ctypes.c_int, i64, i64, f32, vp, i64, i64, vp]
    lib.lmloss_row_sums.restype = None
    lib.lmloss_row_grads.argtypes = [vp, ctypes.c_int, i64, i64, f32, vp, vp, vp, i64, i64, vp]
    lib.lmloss_row_grads.restype = ctypes.c_int
    lib.lmloss_causal_probs.argtypes = [vp, i64, i64, f32, i64, i64, vp]
    lib.lmloss_causal_probs.restype = i64
    return lib


def handles(logits: torch.Tensor) -> bool:
    """Whether the C loops take these (N, V) logits: on the CPU, float32/bfloat16/float16, unit column stride."""
    return (logits.device.type == "cpu" and logits.dtype in _DTYPE_CODES
            and (logits.stride(1) == 1 or logits.shape[1] == 1) and logits.shape[0] > 0)


def _row_sums(logits: torch.Tensor, c: torch.Tensor, L: float) -> torch.Tensor:
    """(N, 1) float64 sums of 2^(fma(x, L, c)) per row; +inf where a row overflows, NaN where it holds a NaN or
    infinite logit (native_cpu.c): chunked.nll_lse redoes both kinds exactly."""
    lib = _require()
    N, V = logits.shape
    c = c.reshape(-1).contiguous()
    sums = torch.empty(N, dtype=torch.float64)
    code, stride, x = _DTYPE_CODES[logits.dtype], logits.stride(0), logits.data_ptr()

    def rows(start, end):
        lib.lmloss_row_sums(x, code, stride, V, L, c.data_ptr(), start, end, sums.data_ptr())

    parallel_rows(rows, N, _MIN_RANGE_ROWS, logits.device, ranges_per_thread=_RANGES_PER_THREAD)
    return sums[:, None]


def nll_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """chunked.nll_lse's contract and formulas, its row sums from the C loop (eager path where it does not apply)."""
    if not handles(logits):
        return chunked.nll_lse(logits, targets, ignore_index)
    return chunked.nll_lse(logits, targets, ignore_index, row_sums=_row_sums)


def grad_logits(logits, targets, lse, grad_nll, out):
    """chunked.grad_logits's contract: out = (softmax(x) - onehot(t)) * grad_nll, one C loop per row."""
    if not (handles(logits) and out.dtype == logits.dtype and out.is_contiguous()):
        return chunked.grad_logits(logits, targets, lse, grad_nll, out)
    lib = _require()
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    L = chunked._log2e(cdt)
    c = (lse.double() * -L).to(cdt).contiguous()
    g = grad_nll.to(cdt).contiguous()
    t = targets.contiguous()
    advise_huge_pages(out)
    code, stride, x, o = _DTYPE_CODES[logits.dtype], logits.stride(0), logits.data_ptr(), out.data_ptr()
    failed = []

    def rows(start, end):
        if lib.lmloss_row_grads(x, code, stride, V, L, c.data_ptr(), t.data_ptr(), g.data_ptr(), start, end, o):
            failed.append((start, end))

    parallel_rows(rows, N, _MIN_RANGE_ROWS, logits.device, ranges_per_thread=_RANGES_PER_THREAD)
    if failed:
        raise MemoryError(f"the native backward could not allocate a row buffer of {V} float32 values")
    return out


def causal_probs(scores: torch.Tensor, first: int, c: float, sums: torch.Tensor) -> int:
    """In place on a contiguous float32 (rows, n) block of attention scores whose row i sees the columns
    j < first + i: scores <- exp(scale * (s - rowmax)) there and 0 beyond, sums[:rows] <- their row sums
    (float32), c = scale * log2(e). Returns how many rows hold a NaN or infinite score (native_cpu.c)."""
    lib = _require()
    rows, n = scores.shape
    assert scores.dtype == torch.float32 and scores.is_contiguous() and sums.dtype == torch.float32
    assert sums.is_contiguous() and sums.numel() >= rows
    return lib.lmloss_causal_probs(scores.data_ptr(), n, first, c, 0, rows, sums.data_ptr())
