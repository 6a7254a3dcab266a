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

The same library holds the CPU causal attention's pieces (cpu_attention.py): the whole layer in one call where
it is built with AVX-512 (`attention`, `attention_ready()`), else the softmax rows (causal_probs). Extra compiler
flags come from LMLOSS_NATIVE_CFLAGS (e.g. "-mno-avx512f": this CPU as an AVX2 host; they are part of the key).

Threads: where torch runs on GCC's OpenMP runtime (libgomp, the Linux wheels) and the compiler is GCC, the
library is built with -fopenmp and its *_all drivers split the rows over torch's own OpenMP threads. Python
worker threads (parallel_rows) would run beside those threads, which keep spinning for a while after every
parallel torch op and take the cores: 4096 x 50257 float32 forward 22.1 -> 18.8 ms (one read of the logits,
x.sum(), takes 17.3), bfloat16 24.7 -> 19.7 ms, 2 Zen 5 cores. Elsewhere, or with LMLOSS_NATIVE_OPENMP=0, the
rows go to parallel_rows; both split the same per-row loops, so the numbers are identical.

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
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd", "-fPIC", "-shared")
_CHUNKS_PER_THREAD = 16  # OpenMP drivers: rows are handed out in chunks of about rows / (threads * this)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_RANGE_ROWS = 4  # rows per worker range at least: one ctypes call each
_RANGES_PER_THREAD = 4

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the library is not available, once a build was tried
_omp = False  # the library's *_all drivers run on torch's own OpenMP threads (decided when it is loaded)


def status() -> tuple[bool, str]:
    """(available, a line saying which library was loaded, or why none was)."""
    lib = _library()
    if lib is None:
        return False, _reason
    threads = "on torch's OpenMP threads" if _omp else "on Python worker threads (no shared OpenMP runtime)"
    return True, f"loaded {lib._name}; rows {threads}"


def available() -> bool:
    return _library() is not None


def on_torch_threads() -> bool:
    """available(), with the *_all drivers on torch's own OpenMP threads (the elementwise layers, the
    attention's passes and the fused head's fold take the C loops only then)."""
    return available() and _omp


def _library() -> ctypes.CDLL | None:
    global _lib, _reason
    with _lock:
        if _lib is None and _reason is None:
            try:
                _compiler()  # LMLOSS_NATIVE=0, or no compiler: no library
                try:
                    _lib = _build_and_load(openmp=True)
                except (OSError, AttributeError, RuntimeError):  # the OpenMP build did not compile or load
                    _lib = _build_and_load(openmp=False)
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                _reason = str(e)
        return _lib


def _build_and_load(openmp: bool) -> ctypes.CDLL:
    path = _build(openmp)
    try:
        return _load(path)
    except (OSError, AttributeError):  # a damaged file in the cache (a full disk, a killed writer): build it again
        path.unlink(missing_ok=True)
        return _load(_build(openmp))


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


def _openmp_runtimes() -> set[str]:
    """The files of the OpenMP runtimes (libgomp) mapped into this process: torch's own, once torch is
    imported, where torch was built with GCC's OpenMP (the Linux wheels)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    paths = {line.split(None, 5)[5] for line in maps if len(line.split(None, 5)) == 6}
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith("libgomp")}


def _openmp_flags(version: str) -> tuple[str, ...]:
    """("-fopenmp",) where the library's OpenMP drivers can share torch's OpenMP threads: torch runs on
    libgomp and the compiler is GCC (whose -fopenmp code calls libgomp; the loader then binds it to the
    libgomp torch already loaded, matched by its name libgomp.so.1). Else no OpenMP: rows go to Python threads."""
    if os.environ.get("LMLOSS_NATIVE_OPENMP", "1") == "0" or len(_openmp_runtimes()) != 1:
        return ()
    return ("-fopenmp",) if "Free Software Foundation" in version and "clang" not in version.lower() else ()


def _build(openmp: bool = True) -> Path:
    """The compiled library's path, compiling it first when the cache lacks it (written atomically); with
    OpenMP where `openmp` and _openmp_flags allow it."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    extra = os.environ.get("LMLOSS_NATIVE_CFLAGS", "").split()
    flags = (*_FLAGS, *extra, *(_openmp_flags(version) if openmp else ()))
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, *flags, _cpu_flags()]).encode()).hexdigest()
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
            done = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
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
    global _omp
    before = _openmp_runtimes()
    lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL: worker threads run the rows in parallel
    i64, f32, vp, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.lmloss_omp_threads.argtypes = []
    lib.lmloss_omp_threads.restype = i32
    lib.lmloss_row_sums_all.argtypes = [vp, i32, i64, i64, f32, vp, i64, i64, i32, vp]
    lib.lmloss_row_sums_all.restype = None
    lib.lmloss_row_grads_all.argtypes = [vp, i32, i64, i64, f32, vp, vp, vp, i64, i64, i32, vp]
    lib.lmloss_row_grads_all.restype = i32
    lib.lmloss_causal_probs_all.argtypes = [vp, i64, i64, i64, f32, i64, i64, i32, vp]
    lib.lmloss_causal_probs_all.restype = i64
    lib.lmloss_divide_rows_all.argtypes = [vp, vp, i64, i64, i64, i64, i64, i64, i32, vp]
    lib.lmloss_divide_rows_all.restype = None
    lib.lmloss_rms_norm_all.argtypes = [vp, vp, f32, i64, i64, i64, i32, vp]
    lib.lmloss_rms_norm_all.restype = None
    lib.lmloss_silu_mul_all.argtypes = [vp, vp, i64, i64, i32, vp]
    lib.lmloss_silu_mul_all.restype = None
    lib.lmloss_rope_all.argtypes = [vp, i64, i64, i64, vp, vp, i64, i64, i64, i64, i64, i64, i32, vp]
    lib.lmloss_rope_all.restype = None
    lib.lmloss_fold_tile_all.argtypes = [vp, i64, i64, i64, vp, i32, vp, vp, i64, i32]
    lib.lmloss_fold_tile_all.restype = None
    lib.lmloss_attention_ready.argtypes = []
    lib.lmloss_attention_ready.restype = i32
    lib.lmloss_attention_all.argtypes = [vp, vp, vp, *[i64] * 13, f32, i32, vp, vp]
    lib.lmloss_attention_all.restype = i64
    # the drivers only where they run on the runtime that was already here (torch's), not on a second one
    _omp = lib.lmloss_omp_threads() > 0 and len(before) == 1 and _openmp_runtimes() == before
    lib.lmloss_row_sums.argtypes = [vp, ctypes.c_int, i64, i64, f32, vp, i64, i64, vp]
    lib.lmloss_row_sums.restype = None
    lib.lmloss_row_grads.argtypes = [vp, ctypes.c_int, i64, i64, f32, vp, vp, vp, i64, i64, vp]
    lib.lmloss_row_grads.restype = ctypes.c_int
    lib.lmloss_causal_probs.argtypes = [vp, i64, i64, i64, f32, i64, i64, vp]
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
    if _omp:
        n_threads, chunk = _threads_and_chunk(N)
        lib.lmloss_row_sums_all(x, code, stride, V, L, c.data_ptr(), N, chunk, n_threads, sums.data_ptr())
        return sums[:, None]

    def rows(start, end):
        lib.lmloss_row_sums(x, code, stride, V, L, c.data_ptr(), start, end, sums.data_ptr())

    parallel_rows(rows, N, _MIN_RANGE_ROWS, logits.device, ranges_per_thread=_RANGES_PER_THREAD)
    return sums[:, None]


def _chunk(n_rows: int, n_threads: int) -> int:
    """Rows per chunk for the OpenMP drivers: about _CHUNKS_PER_THREAD chunks per thread."""
    return max(1, -(-n_rows // (n_threads * _CHUNKS_PER_THREAD)))


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
    if _omp:
        n_threads, chunk = _threads_and_chunk(N)
        if lib.lmloss_row_grads_all(x, code, stride, V, L, c.data_ptr(), t.data_ptr(), g.data_ptr(), N, chunk,
                                    n_threads, o):
            failed.append((0, N))

    def rows(start, end):
        if lib.lmloss_row_grads(x, code, stride, V, L, c.data_ptr(), t.data_ptr(), g.data_ptr(), start, end, o):
            failed.append((start, end))

    if not _omp:
        parallel_rows(rows, N, _MIN_RANGE_ROWS, logits.device, ranges_per_thread=_RANGES_PER_THREAD)
    if failed:
        raise MemoryError(f"the native backward could not allocate a row buffer of {V} float32 values")
    return out


def causal_probs(scores: torch.Tensor, first: int, c: float, sums: torch.Tensor, period: int | None = None) -> int:
    """In place on a contiguous float32 (rows, n) block of attention scores whose row i sees the columns
    j < first + (i mod period) (period: rows per head where the block stacks heads; default all rows):
    scores <- exp(scale * (s - rowmax)) there and 0 beyond, sums[:rows] <- their row sums (float32),
    c = scale * log2(e). Returns how many rows hold a NaN or infinite score (native_cpu.c)."""
    lib = _require()
    rows, n = scores.shape
    period = rows if period is None else period
    assert scores.dtype == torch.float32 and scores.is_contiguous() and sums.dtype == torch.float32
    assert sums.is_contiguous() and sums.numel() >= rows and period > 0
    if _omp:
        n_threads, chunk = _threads_and_chunk(rows)
        return lib.lmloss_causal_probs_all(scores.data_ptr(), n, first, period, c, rows, chunk, n_threads,
                                           sums.data_ptr())
    return lib.lmloss_causal_probs(scores.data_ptr(), n, first, period, c, 0, rows, sums.data_ptr())


def divide_rows(o: torch.Tensor, sums: torch.Tensor, out: torch.Tensor) -> None:
    """out[r, g, :] = o[g, r, :] / sums[g, r] for contiguous float32 o (group, rows, Dv) and sums (group, rows),
    out a float32 (rows, group, Dv) view with unit stride over Dv (the attention's output layout)."""
    lib = _require()
    group, rows, Dv = o.shape
    assert o.dtype == sums.dtype == out.dtype == torch.float32 and o.is_contiguous() and sums.is_contiguous()
    assert sums.shape == (group, rows) and out.shape == (rows, group, Dv) and out.stride(2) == 1
    n_threads, chunk = _threads_and_chunk(group * rows)
    lib.lmloss_divide_rows_all(o.data_ptr(), sums.data_ptr(), group, rows, Dv, out.stride(0), out.stride(1), chunk,
                               n_threads, out.data_ptr())


def attention_ready() -> bool:
    """Whether `attention` runs: the library built with AVX-512 and on torch's OpenMP threads."""
    lib = _library()
    return lib is not None and _omp and lib.lmloss_attention_ready() == 1


def attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, c: float, out: torch.Tensor,
              bad: torch.Tensor, window: int | None = None) -> int:
    """Causal attention of a layer in one call (native_cpu.c, where attention_ready()): for float32 q (B, H, T, D)
    and v (B, Hk, T, Dv) with unit stride over their last dimension, kt = k in panels of 32 keys transposed,
    contiguous (B, Hk, Tp / 32, D, 32), Tp = T rounded up to a multiple of 32 (keys past T zero),
    out[b, t, h] <- softmax over t - window < j <= t of 2^(c q[b, h, t] . k[b, hk, j]) weighting v[b, hk, j],
    hk = h // (H / Hk) (window None: all j <= t),
    into a contiguous float32 out (B, T, H, Dv). Rows with a NaN or infinite score get bad[b, h, t] = 1 (a zeroed
    contiguous uint8 (B, H, T)), their out unspecified; returns how many."""
    lib = _require()
    B, H, T, D = q.shape
    Hk, Dv = v.shape[1], v.shape[-1]
    assert q.dtype == kt.dtype == v.dtype == out.dtype == torch.float32 and bad.dtype == torch.uint8
    assert q.stride(3) == 1 and v.stride(3) == 1 and kt.is_contiguous() and out.is_contiguous() and bad.is_contiguous()
    assert kt.shape == (B, Hk, -(-T // 32), D, 32) and v.shape == (B, Hk, T, Dv) and H % Hk == 0
    assert out.shape == (B, T, H, Dv)
    assert bad.shape == (B, H, T)
    n = lib.lmloss_attention_all(q.data_ptr(), kt.data_ptr(), v.data_ptr(), B, H, Hk, T, D, Dv, q.stride(0),
                                 q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2), window or 0, c,
                                 torch.get_num_threads(), out.data_ptr(), bad.data_ptr())
    if n == -1:
        raise MemoryError(f"lmloss native attention: no memory for a {T}-key scratch per thread")
    if n < 0:
        raise RuntimeError("lmloss native attention is not built on this CPU (attention_ready() is False)")
    return n


# Elementwise layers (native_cpu.c; lmloss/ops/cpu_layers.py decides when they apply): float32, contiguous
# where it says so, unchecked beyond the asserts; each writes a new tensor and leaves its inputs alone.

def _threads_and_chunk(n_rows: int) -> tuple[int, int]:
    n_threads = torch.get_num_threads() if _omp else 1
    return n_threads, _chunk(n_rows, n_threads)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) for contiguous float32 x (..., n) and weight (n,)."""
    lib = _require()
    n = x.shape[-1]
    assert x.dtype == weight.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous()
    assert weight.shape == (n,) and n > 0
    out = torch.empty_like(x)
    rows = x.numel() // n
    n_threads, chunk = _threads_and_chunk(rows)
    lib.lmloss_rms_norm_all(x.data_ptr(), weight.data_ptr(), eps, n, rows, chunk, n_threads, out.data_ptr())
    return out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u for contiguous float32 g and u of one shape."""
    lib = _require()
    assert g.dtype == u.dtype == torch.float32 and g.shape == u.shape and g.is_contiguous() and u.is_contiguous()
    out = torch.empty_like(g)
    n_threads, chunk = _threads_and_chunk(-(-g.numel() // 4096))  # SILU_BLOCK elements per row
    lib.lmloss_silu_mul_all(g.data_ptr(), u.data_ptr(), g.numel(), chunk, n_threads, out.data_ptr())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos[:, None] + rotate_half(x) * sin[:, None] (transformers' apply_rotary_pos_emb on one tensor) for
    float32 x (B, H, T, D) with unit stride over D (any other strides), cos and sin contiguous (B or 1, T, D),
    D even. Returns a contiguous (B, H, T, D) tensor."""
    lib = _require()
    B, H, T, D = x.shape
    assert x.dtype == cos.dtype == sin.dtype == torch.float32 and x.stride(3) == 1 and D % 2 == 0
    assert cos.shape == sin.shape and cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1:] == (T, D)
    assert cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty(B, H, T, D, dtype=torch.float32)
    n_threads, chunk = _threads_and_chunk(B * H * T)
    lib.lmloss_rope_all(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
                        cos.shape[0], B, H, T, D, chunk, n_threads, out.data_ptr())
    return out


def fold_tile(z: torch.Tensor, c0: int, targets: torch.Tensor, first: bool, lse: torch.Tensor,
              target_logit: torch.Tensor) -> None:
    """One (rows, cols) float32 tile of logits for the vocabulary columns [c0, c0 + cols) folded into the
    running log-sum-exp `lse` (float64, in place; set by the first tile) and, where a row's target is in the
    tile, its logit into `target_logit` (float32, in place): native_cpu.c's lmloss_fold_tile_all."""
    lib = _require()
    rows, cols = z.shape
    assert z.dtype == torch.float32 and z.is_contiguous() and targets.dtype == torch.int64 and targets.is_contiguous()
    assert lse.dtype == torch.float64 and lse.is_contiguous() and lse.shape == (rows,) and targets.shape == (rows,)
    assert target_logit.dtype == torch.float32 and target_logit.is_contiguous() and target_logit.shape == (rows,)
    n_threads, chunk = _threads_and_chunk(rows)
    lib.lmloss_fold_tile_all(z.data_ptr(), rows, cols, c0, targets.data_ptr(), int(first), lse.data_ptr(),
                             target_logit.data_ptr(), chunk, n_threads)
