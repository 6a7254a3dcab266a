"""Benchmark the fused linear cross-entropy against building the logits first.

    python scripts/bench_linear_nll.py                          # CPU: N=8192, d=768, V=50257 and 262144
    python scripts/bench_linear_nll.py --vocab 50257 --rounds 1  # quicker
    python scripts/bench_linear_nll.py --threads 1               # steadier on a busy machine
    python scripts/bench_linear_nll.py --device cuda            # GPU: fwd and fwd+bwd vs CCE / Liger / compile
    python scripts/bench_linear_nll.py --out results_linear.jsonl

CPU methods (forward, per-token NLL of logits = hidden @ weight.T):
    fused        lmloss.linear_token_nll(hidden, weight, targets)       never builds the logits
    mm+token_nll lmloss.token_nll(hidden @ weight.T, targets)
    mm+F.ce      F.cross_entropy(hidden @ weight.T, targets, reduction="none")
Every method is first checked against lmloss's float64 reference on the first rows.

CPU memory method: each measurement runs in a fresh subprocess that builds the inputs, warms the
method up on 64 rows, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`),
reads VmRSS, runs the method, and reports peak extra = VmHWM - VmRSS(before): the most memory the
call ever held beyond its inputs, whatever allocator freed in between. Rounds alternate the
methods so that load from other processes hits all of them alike; times are medians over rounds.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import lmloss

CPU_METHODS = ("fused", "mm+token_nll", "mm+F.ce")


def make_inputs(N, d, V, dtype, device, seed=0):
    """hidden (N, d), weight (V, d) with logits of std ~3, targets (N,); built in place (no
    temporary copies, so the peak RSS before the measurement is the inputs themselves)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, device=device).to(dtype)
    weight = torch.randn(V, d, generator=g, device=device).mul_(3 / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    return hidden, weight, targets


def cpu_method(name):
    return {
        "fused": lambda h, w, t: lmloss.linear_token_nll(h, w, t),
        "mm+token_nll": lambda h, w, t: lmloss.token_nll(h @ w.T, t),
        "mm+F.ce": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="none"),
    }[name]


def _proc_kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def worker(args):
    """One measurement in this (fresh) process: -> one JSON line on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hidden, weight, targets = make_inputs(args.N, args.d, args.worker_vocab, dtype, "cpu")
    fn = cpu_method(args.worker)
    fn(hidden[:64], weight, targets[:64])  # warm-up: thread pools, MKL, first-call costs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss_before_kib = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn(hidden, weight, targets)
    time_ms = (time.perf_counter() - t0) * 1e3
    peak_extra_mib = (_proc_kib("VmHWM") - rss_before_kib) / 1024
    print(json.dumps({"time_ms": time_ms, "peak_extra_mib": peak_extra_mib,
                      "nll_mean": float(out.double().mean())}))


def validate(N, d, V, dtype, device, n_rows=256):
    """Each method on the first rows against lmloss's float64 reference token_nll."""
    hidden, weight, targets = make_inputs(N, d, V, dtype, device)
    h, t = hidden[:n_rows], targets[:n_rows]
    ref = lmloss.token_nll((h.double() @ weight.double().T), t, impl="reference")
    for name in CPU_METHODS:
        err = (cpu_method(name)(h, weight, t).double() - ref).abs().max().item()
        if err > (1e-3 if dtype == torch.float32 else 5e-2):
            raise SystemExit(f"{name} disagrees with the reference at V={V}: max |err| = {err:.3g}")
    print(f"V={V}: all methods match the float64 reference on {n_rows} rows")


def mem_available_gib():
    return _meminfo_kib("MemAvailable") / 2**20


def _meminfo_kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/meminfo").read()).group(1))


def run_cpu(args, emit):
    dtype = getattr(torch, args.dtype)
    for V in args.vocab:
        logits_mib = args.N * V * 4 / 2**20
        inputs_mib = (args.N + V) * args.d * dtype.itemsize / 2**20
        validate(args.N, args.d, V, dtype, "cpu")
        # mm+token_nll holds the logits; mm+F.ce holds the logits and log-probabilities
        need_mib = {"fused": 64, "mm+token_nll": logits_mib, "mm+F.ce": 2 * logits_mib}
        times, peaks = {m: [] for m in CPU_METHODS}, {m: 0.0 for m in CPU_METHODS}
        for r in range(args.rounds):
            order = CPU_METHODS if r % 2 == 0 else CPU_METHODS[::-1]
            for m in order:
                free_mib = mem_available_gib() * 1024
                if need_mib[m] + inputs_mib + 1024 > free_mib:
                    print(f"  skip {m} at V={V}: needs ~{(need_mib[m] + inputs_mib) / 1024:.1f} GiB,"
                          f" {free_mib / 1024:.1f} GiB available")
                    continue
                cmd = [sys.executable, __file__, "--worker", m, "--worker-vocab", str(V),
                       "--N", str(args.N), "--d", str(args.d), "--dtype", args.dtype,
                       *(["--threads", str(args.threads)] if args.threads else [])]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    why = " (killed: out of memory?)" if res.returncode == -9 else ""
                    print(f"  {m} at V={V} failed (rc {res.returncode}){why}: {res.stderr[-400:]}")
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                times[m].append(row["time_ms"])
                peaks[m] = max(peaks[m], row["peak_extra_mib"])
                print(f"  round {r} {m:13s} {row['time_ms']:9.0f} ms  peak extra "
                      f"{row['peak_extra_mib']:8.1f} MiB  mean nll {row['nll_mean']:.5f}")
        med = {m: sorted(ts)[len(ts) // 2] for m, ts in times.items() if ts}
        for m in med:
            emit(dict(op="linear_token_nll", impl=m, dtype=args.dtype, N=args.N, d=args.d, V=V,
                      time_ms_p50=round(med[m], 1), n_rounds=len(times[m]),
                      peak_mem_mib=round(peaks[m], 1), logits_mib=round(logits_mib, 1),
                      ns_per_token=round(med[m] * 1e6 / args.N)))
        print(f"V={V}: logits would be {logits_mib:.0f} MiB; 5% budget {0.05 * logits_mib:.0f} MiB; "
              f"fused peak extra {peaks['fused']:.1f} MiB "
              f"({100 * peaks['fused'] / logits_mib:.2f}% of the logits)")
        for base in ("mm+token_nll", "mm+F.ce"):
            if "fused" in med and base in med:
                print(f"  fused time / {base} time = {med['fused'] / med[base]:.3f}"
                      f"  ({med[base] / med['fused']:.2f}x faster)")
            elif base not in med:
                print(f"  {base}: not measured (skipped or failed for lack of memory, see above)")


def _f64_sum(hidden, weight, targets, rows=1024):
    """sum over tokens of the float64 NLL, a block of rows at a time (no float64 N x V tensor)."""
    w64 = weight.double()
    total = 0.0
    for i in range(0, hidden.shape[0], rows):
        z = hidden[i:i + rows].double() @ w64.T
        total += torch.nn.functional.cross_entropy(z, targets[i:i + rows], reduction="sum").item()
    return total


def cuda_methods(args):
    """name -> fn(hidden, weight, targets) -> summed loss (differentiable where the method is)."""
    methods = {
        "lmloss": lambda h, w, t: lmloss.linear_cross_entropy(h, w, t, reduction="sum"),
        "mm+lmloss.token_nll": lambda h, w, t: lmloss.cross_entropy(h @ w.T, t, reduction="sum"),
        "mm+F.ce": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum"),
    }
    if not args.no_compile:
        methods["torch.compile(mm+F.ce)"] = torch.compile(
            lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum"))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        methods["cce"] = lambda h, w, t: cce(h, w, t, reduction="sum")
    except ImportError:
        print("  cut_cross_entropy not importable (pip install cut-cross-entropy): skipped")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lig
        methods["liger"] = lambda h, w, t: lig(h, w, t, reduction="sum")
    except ImportError:
        print("  liger_kernel not importable (pip install liger-kernel): skipped")
    return methods


def run_cuda(args, emit):
    """Forward and forward+backward on the GPU: lmloss (Triton forward, chunked backward) against
    the logits paths, a torch.compile'd matmul + CE, Cut Cross-Entropy and Liger-Kernel (when
    importable). Each method's full-size loss is first checked against a float64 sum; time is
    triton.testing.do_bench's median; memory is the peak allocated beyond the inputs."""
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    methods = cuda_methods(args)
    tol = 1e-4 if dtype == torch.float32 else 2e-3  # relative, on the sum over N tokens
    for V in args.vocab:
        hidden, weight, targets = make_inputs(args.N, args.d, V, dtype, "cuda")
        ref = _f64_sum(hidden, weight, targets)
        logits_mib = args.N * V * 4 / 2**20
        for name, fn in methods.items():
            for mode in ("fwd", "fwd+bwd"):
                try:
                    h = hidden.detach().requires_grad_(mode == "fwd+bwd")
                    w = weight.detach().requires_grad_(mode == "fwd+bwd")
                    if mode == "fwd":
                        def step():
                            with torch.no_grad():
                                return fn(h, w, targets)
                    else:
                        def step():
                            loss = fn(h, w, targets)
                            loss.backward()
                            return loss
                    got = step().item()  # warm-up (compiles) and the check
                    rel = abs(got - ref) / abs(ref)
                    h.grad = w.grad = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    step()
                    torch.cuda.synchronize()
                    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
                    time_ms = do_bench(step, grad_to_none=[h, w], return_mode="median")
                    emit(dict(op=f"linear_cross_entropy {mode}", impl=name, dtype=args.dtype, N=args.N,
                              d=args.d, V=V, time_ms_p50=round(time_ms, 3), peak_extra_mib=round(peak_mib, 1),
                              logits_fp32_mib=round(logits_mib, 1), rel_err_vs_f64=float(f"{rel:.3g}"),
                              matches=rel <= tol))
                except Exception as e:  # one library failing must not hide the others' numbers
                    print(f"  {name} {mode} V={V} failed: {type(e).__name__}: {str(e)[:300]}")
                finally:
                    h = w = None
                    torch.cuda.empty_cache()
        del hidden, weight, targets
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--vocab", type=int, nargs="+", default=[50257, 262144])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds per method")
    p.add_argument("--threads", type=int, help="CPU: torch threads per measurement (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="CUDA: leave out the torch.compile baseline")
    p.add_argument("--out", help="append one JSON row per measurement to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=device_name, torch=torch.__version__, triton=triton_version,
                lmloss=lmloss.__version__, threads=args.threads or torch.get_num_threads())

    def emit(row):
        row = {**row, **meta, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    print(f"{meta}; {mem_available_gib():.1f} GiB memory available")
    (run_cuda if args.device == "cuda" else run_cpu)(args, emit)


if __name__ == "__main__":
    main()
