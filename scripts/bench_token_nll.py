"""Validate, then time lmloss.token_nll / cross_entropy against F.cross_entropy and a compiled baseline.

    python scripts/bench_token_nll.py                              # 3 shapes x fp32, bf16: ~3 min on 2 cores
    python scripts/bench_token_nll.py --quick                      # one small shape, a smoke test
    python scripts/bench_token_nll.py --shapes 4096x50257 --dtypes fp32 --ops forward
    python scripts/bench_token_nll.py --out bench.jsonl            # one JSON row per measurement

First every implementation is checked against lmloss's float64 reference ("all implementations
match"), then each (shape, dtype, op) is timed for every contender, interleaved round by round so
that load from other processes hits all of them alike; ratios are against F.cross_entropy measured
in the same run (and against torch.compile, "x vs compile"). Contenders: torch (F.cross_entropy(logits.float(), ...)), torch.compile
(log_softmax + gather, compiled once with dynamic shapes; compile time reported, not timed),
lmloss's implementations for the device (CPU: "chunked", eager torch ops, and "native", its C loops, built
once per machine and not timed; a line says why when they are not available), and on CUDA Liger-Kernel when
importable (Cut
Cross-Entropy has no logits-level loss; it belongs with the fused linear benchmark).

Floor, "floor_ms" and "pct_of_floor" (CPU): what any implementation must spend, measured in the same
rounds as the contenders (so under the same load) and printed once per (dtype, op):
    read_ms   logits.sum() on all threads: one read of the logits from memory
    write_ms  fill_ of an already-mapped tensor like the logits: one write of the gradient (backward only)
    exp_ms    N*V exponentials: the faster of torch.exp and torch.exp2, out= into a cache-resident block,
              on every thread at once (lmloss's row workers), so no memory traffic
    floor_ms  forward:          max(read_ms, exp_ms)
              forward+backward: max(read_ms + write_ms, exp_ms)   (one fused pass could do both)
pct_of_floor = 100 * floor_ms / time_ms_p50: 100% would be a kernel that hides all its exp work under one
read of the logits. On CUDA the floor is not measured.

Memory, "peak_extra_mib": on CUDA, torch.cuda.max_memory_allocated() minus the allocation before the
call. On CPU, tracemalloc does not see torch's allocator, so a thread samples the process RSS
(/proc via psutil) every 0.5 ms during one untimed call: peak RSS minus RSS before the call, with the
inputs already resident. Large CPU tensors are mmap'ed and returned on free, so this sees each
N x V temporary; it can miss a spike shorter than the sampling period.

Fresh memory, "--malloc" (CPU): glibc hands every allocation over 32 MiB straight to mmap and returns it
on free, so each forward+backward's N x V gradient (and F.cross_entropy's log-probabilities) is new
memory that the kernel must fault in and zero, every call: 0.1-0.9 s of system time per 823 MB here,
varying from call to call. That is what a CPU training loop pays by default, so it is the default.
--malloc keep reruns the benchmark with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^40 (glibc's
tunables: big blocks come from the heap and stay mapped when freed, as jemalloc or tcmalloc would
keep them), which shows the kernels' own speed; the RSS-based memory column is then meaningless
(freed memory is reused, not returned) and prints as "-".
"""

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import lmloss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = "4096x50257,1024x128256,512x262144"
OVERWRITES_INPUT = {"liger"}  # Liger writes its gradient into the logits: it gets a private copy


# ---- contenders: each maps (logits, targets) -> per-token or scalar loss ----------------------------------

def torch_nll(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _log_softmax_gather(logits, targets):
    return -logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def _lmloss_impls(device: torch.device) -> list[str]:
    """lmloss's implementations for the device: chunked always; native on CPU where its C library builds."""
    if device.type == "cuda":
        return ["chunked", "triton"]
    from lmloss.ops import native

    ok, why = native.status()
    if not ok:
        print(f"lmloss.native not available: {why}")
    return ["chunked"] + (["native"] if ok else [])


def contenders(device: torch.device) -> dict:
    """name -> fn(logits, targets) -> (N,) nll. Optional packages are imported here, skipped if missing."""
    fns = {"torch": torch_nll, "torch.compile": torch.compile(_log_softmax_gather, dynamic=True)}
    impls = _lmloss_impls(device)
    for impl in impls:
        fns[f"lmloss.{impl}"] = lambda x, t, impl=impl: lmloss.token_nll(x, t, impl=impl)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
            fns["liger"] = lambda x, t: liger_cross_entropy(x, t, reduction="none")
        except ImportError:
            print("Liger-Kernel not importable (pip install liger-kernel): skipped")
        # Cut Cross-Entropy has no logits-level loss: it fuses the classifier matmul, so it is
        # compared against lmloss.linear_cross_entropy, not here.
    return fns


# ---- validation ---------------------------------------------------------------------------------------

def validate(device: torch.device, dtypes) -> None:
    """Every lmloss implementation, forward and backward, against lmloss's float64 reference."""
    impls = _lmloss_impls(device)
    for dtype in dtypes:
        logits = (torch.randn(64, 50257, device=device) * 10).to(dtype)
        targets = torch.randint(0, 50257, (64,), device=device)
        targets[::9] = -100
        g = torch.rand(64, device=device)
        x_ref = logits.clone().requires_grad_()
        ref = lmloss.token_nll(x_ref, targets, impl="reference")
        ref.backward(g)
        for impl in impls:
            x = logits.clone().requires_grad_()
            got = lmloss.token_nll(x, targets, impl=impl)
            got.backward(g)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"{impl} {dtype} nll: {m}")
            torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=2 * torch.finfo(dtype).eps,
                                       atol=1e-6, msg=lambda m: f"{impl} {dtype} grad: {m}")
            if not torch.equal(x.detach(), logits):
                raise AssertionError(f"{impl} wrote to its input logits")
    print(f"all implementations match ({', '.join(impls)} vs reference; {len(dtypes)} dtypes, forward and backward)")


# ---- timing and memory --------------------------------------------------------------------------------

def _step(fn, op, logits, targets):
    """One call: forward -> (N,) nll; forward+backward -> mean loss, backward into a fresh leaf."""
    if op == "forward":
        with torch.no_grad():
            return fn(logits, targets)
    x = logits.detach().requires_grad_()
    fn(x, targets).mean().backward()
    return x.grad


class _RssPeak:
    """Peak resident set size of this process, sampled by a thread, minus the RSS at entry."""

    def __enter__(self):
        import psutil
        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.extra_bytes = self.peak - self.start


def peak_extra_bytes(fn, op, logits, targets) -> int:
    if logits.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, op, logits, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _RssPeak() as rss:
        _step(fn, op, logits, targets)
    return rss.extra_bytes


def time_round_robin(fns: dict, op, inputs: dict, targets, reps: int, probes: dict | None = None) -> dict:
    """name -> list of seconds. CPU: each round runs every contender once, in turn, then each floor probe
    (no arguments). CUDA: do_bench medians."""
    if targets.is_cuda:
        from triton.testing import do_bench
        return {name: [do_bench(lambda fn=fn, x=inputs[name]: _step(fn, op, x, targets), return_mode="median") / 1e3]
                for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _step(fn, op, inputs[name], targets)
            times[name].append(time.perf_counter() - t0)
        for name, fn in (probes or {}).items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(f"floor:{name}", []).append(time.perf_counter() - t0)
    return times


def floor_probes(logits, op) -> dict:
    """name -> fn() for the floor's parts (see the module docstring), timed in the contenders' rounds."""
    from lmloss.ops._threads import parallel_rows
    N, V = logits.shape
    block = torch.randn(8, 8192)  # (8, 8192) float32: 256 KiB, cache-resident on each worker
    n_calls = -(-N * V // block.numel())

    def exps(fn):
        def run():
            def worker(start, end):
                out = torch.empty_like(block)
                for _ in range(start, end):
                    fn(block, out=out)
            parallel_rows(worker, n_calls, 1, logits.device)
        return run

    probes = {"read": lambda: logits.sum(), "exp": exps(torch.exp), "exp2": exps(torch.exp2)}
    if op != "forward":
        grad = torch.empty_like(logits).fill_(0)  # mapped already: a write, not page faults
        probes["write"] = lambda: grad.fill_(0)
    return probes


def floor_ms(probe_ms: dict, op) -> float:
    exp_ms = min(probe_ms["exp"], probe_ms["exp2"])
    return max(probe_ms["read"] + probe_ms.get("write", 0.0), exp_ms) if op != "forward" else max(
        probe_ms["read"], exp_ms)


def copy_bandwidth_gb_s(logits) -> float:
    """Device copy bandwidth on a tensor the size of logits: read + write bytes / time."""
    dst = torch.empty_like(logits)
    dst.copy_(logits)  # fault the pages in
    if logits.is_cuda:
        from triton.testing import do_bench
        seconds = do_bench(lambda: dst.copy_(logits), return_mode="median") / 1e3
    else:
        seconds = min(_timed(lambda: dst.copy_(logits)) for _ in range(3))
    return 2 * logits.numel() * logits.element_size() / seconds / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- main ---------------------------------------------------------------------------------------------

def cpu_name() -> str:
    """lscpu's model name and its SIMD flags (avx2, avx512*, amx*), e.g. "AMD EPYC [avx2]"."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name", model)
        flags = sorted(f for f in fields.get("flags", "").split() if f == "avx2" or f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return f"{model} [{' '.join(flags) or 'no avx2'}]"


def versions(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": f"{device.type}: {name}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "triton": triton_version, "lmloss": lmloss.__version__}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes must look like 4096x50257,1024x128256, got {text!r}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"N x V list (default {DEFAULT_SHAPES})")
    parser.add_argument("--dtypes", default="fp32,bf16", help="from fp32,bf16,fp16")
    parser.add_argument("--ops", default="forward,forward+backward")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per measurement on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1024x50257, fp32 only")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--out", help="append one JSON row per measurement to this .jsonl file")
    parser.add_argument("--malloc", choices=["default", "keep"], default="default",
                        help="keep: rerun with glibc keeping freed memory mapped (see the module docstring)")
    args = parser.parse_args()
    if args.malloc == "keep" and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads these at start-up
    if args.quick:
        args.shapes, args.dtypes = "1024x50257", "fp32"
    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    meta = versions(device)
    meta["malloc"] = "keep (MALLOC_MMAP_MAX_=0)" if args.malloc == "keep" else "default"
    print(json.dumps(meta))

    validate(device, dtypes)
    fns = contenders(device)
    if args.no_compile:
        fns.pop("torch.compile")
    rows, compiled = [], set()
    for N, V in parse_shapes(args.shapes):
        for dtype in dtypes:
            logits = torch.randn(N, V, device=device).mul_(3).to(dtype)  # (N, V)
            targets = torch.randint(0, V, (N,), device=device)
            copy_gb_s = copy_bandwidth_gb_s(logits)
            for op in args.ops.split(","):
                inputs = {name: logits.clone() if name in OVERWRITES_INPUT else logits for name in fns}
                peak_bytes, warmup_s = {}, {}
                for name, fn in fns.items():  # the warm-up call is also the memory measurement...
                    t0 = time.perf_counter()
                    peak_bytes[name] = peak_extra_bytes(fn, op, inputs[name], targets)
                    warmup_s[name] = time.perf_counter() - t0
                    if name == "torch.compile" and (dtype, op) not in compiled:  # ...unless it compiled
                        compiled.add((dtype, op))
                        peak_bytes[name] = peak_extra_bytes(fn, op, inputs[name], targets)
                probes = floor_probes(logits, op) if device.type == "cpu" else None
                times = time_round_robin(fns, op, inputs, targets, args.reps, probes)
                del inputs, probes
                probe_ms = {k.removeprefix("floor:"): statistics.median(ts) * 1e3 for k, ts in times.items()
                            if k.startswith("floor:")}
                floor = floor_ms(probe_ms, op) if probe_ms else None
                if probe_ms:
                    parts = "  ".join(f"{k} {v:.1f} ms" for k, v in probe_ms.items())
                    print(f"{op:17s} {str(dtype).removeprefix('torch.'):8s} {N:6d}x{V:<7d} floor {floor:.1f} ms "
                          f"(medians: {parts})", flush=True)
                base_s = statistics.median(times["torch"])
                compiled_s = statistics.median(times["torch.compile"]) if "torch.compile" in times else None
                for name, ts in times.items():
                    if name.startswith("floor:"):
                        continue
                    p50 = statistics.median(ts)
                    gb_s = N * V * logits.element_size() / p50 / 1e9  # logits bytes read once
                    row = {"op": op, "impl": name, "dtype": str(dtype).removeprefix("torch."), "N": N, "V": V,
                           "time_ms_p50": round(p50 * 1e3, 3), "time_ms_min": round(min(ts) * 1e3, 3),
                           "speedup_vs_torch": round(base_s / p50, 2),
                           "speedup_vs_compile": round(compiled_s / p50, 2) if compiled_s else None,
                           "floor_ms": round(floor, 3) if floor else None, "floor_parts_ms": probe_ms or None,
                           "pct_of_floor": round(100 * floor / (p50 * 1e3), 1) if floor else None,
                           "peak_extra_mib": round(peak_bytes[name] / 2**20, 1) if args.malloc == "default" else None,
                           "logits_mib": round(logits.numel() * logits.element_size() / 2**20, 1),
                           "ns_per_token": round(p50 * 1e9 / N, 1), "gb_per_s": round(gb_s, 2),
                           "copy_gb_per_s": round(copy_gb_s, 2), "pct_of_copy_bw": round(100 * gb_s / copy_gb_s, 1),
                           "reps": len(ts), "first_call_s": round(warmup_s[name], 2), **meta,
                           "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    rows.append(row)
                    vs_compile = f"{row['speedup_vs_compile']:5.2f}" if compiled_s else "    -"
                    of_floor = f"{row['pct_of_floor']:5.1f}%" if floor else "     -"
                    peak = f"{row['peak_extra_mib']:8.1f}" if row["peak_extra_mib"] is not None else "       -"
                    print(f"{op:17s} {row['dtype']:8s} {N:6d}x{V:<7d} {name:15s} {row['time_ms_p50']:10.2f} ms "
                          f"(min {row['time_ms_min']:9.2f})  x{row['speedup_vs_torch']:<6.2f} vs compile x{vs_compile} "
                          f"floor {of_floor}  peak +{peak} MiB  {gb_s:6.2f} GB/s", flush=True)
            del logits, targets
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
