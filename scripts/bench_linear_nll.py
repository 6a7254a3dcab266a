"""Benchmark the fused linear cross-entropy against building the logits first.

    python scripts/bench_linear_nll.py                          # CPU: N=8192, d=768, V=50257 and 262144
    python scripts/bench_linear_nll.py --vocab 50257 --rounds 1  # quicker
    python scripts/bench_linear_nll.py --threads 1               # steadier on a busy machine
    python scripts/bench_linear_nll.py --device cuda            # GPU: fwd and fwd+bwd vs CCE / Liger / compile
    python scripts/bench_linear_nll.py --device cuda --dtype bfloat16 --modes fwd+bwd \
        --methods lmloss "torch.compile(mm+F.ce)" cce liger     # GPU: the training step only
    python scripts/bench_linear_nll.py --device cuda --dtype bfloat16 --sweep-backward  # backward tiles
    python scripts/bench_linear_nll.py --device cuda --dtype bfloat16 --sweep-backward chunks  # chunked one's
    python scripts/bench_linear_nll.py --out results_linear.jsonl

CPU methods (forward, per-token NLL of logits = hidden @ weight.T):
    fused        lmloss.linear_token_nll(hidden, weight, targets)       never builds the logits
    mm+token_nll lmloss.token_nll(hidden @ weight.T, targets)
    mm+F.ce      F.cross_entropy(hidden @ weight.T, targets, reduction="none")
Every method is first checked against lmloss's float64 reference on the first rows.

CUDA methods: "lmloss" (Triton forward; the default Triton backward, by vocabulary chunks,
lmloss/ops/linear_triton_chunks.py), "lmloss (atomic bwd)" (the same forward; the backward that sums dh
and dW with float32 atomics, lmloss/ops/linear_triton.py), the logits paths,
torch.compile of mm + F.cross_entropy, Cut Cross-Entropy and Liger-Kernel when importable.

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


def _with_backward(choice):
    """lmloss.linear_cross_entropy with lmloss.ops.linear.TRITON_BACKWARD = choice while the graph is
    built (the fused op records it for its backward): its fwd-only row repeats "lmloss"'s forward."""
    import lmloss.ops.linear as lin

    def fn(h, w, t):
        saved, lin.TRITON_BACKWARD = lin.TRITON_BACKWARD, choice
        try:
            return lmloss.linear_cross_entropy(h, w, t, reduction="sum")
        finally:
            lin.TRITON_BACKWARD = saved
    return fn


def cuda_methods(args):
    """name -> fn(hidden, weight, targets) -> summed loss (differentiable where the method is)."""
    methods = {
        "lmloss": lambda h, w, t: lmloss.linear_cross_entropy(h, w, t, reduction="sum"),
        "lmloss (atomic bwd)": _with_backward("atomic"),
        "mm+lmloss.token_nll": lambda h, w, t: lmloss.cross_entropy(h @ w.T, t, reduction="sum"),
        "mm+F.ce": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum"),
    }
    if not args.no_compile:
        methods["torch.compile(mm+F.ce)"] = torch.compile(
            lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum"))
    wanted = lambda name: args.methods is None or name in args.methods  # noqa: E731
    if wanted("cce"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            methods["cce"] = lambda h, w, t: cce(h, w, t, reduction="sum")
        except ImportError:
            print("  cut_cross_entropy not importable (pip install cut-cross-entropy): skipped")
    if wanted("liger"):
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lig
            methods["liger"] = lambda h, w, t: lig(h, w, t, reduction="sum")
        except ImportError:
            print("  liger_kernel not importable (pip install liger-kernel): skipped")
    return {name: fn for name, fn in methods.items() if wanted(name)}


def _f32_grads(hidden, weight, targets, rows=1024):
    """(dh, dW) of the summed NLL in float32 (no tf32), a block of rows at a time: the reference the
    methods' gradients are checked against. -> float32 (N, d), (V, d)."""
    w32 = weight.float()
    dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(w32.shape, dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], rows):
        h32 = hidden[i:i + rows].float()
        dz = torch.softmax(h32 @ w32.T, dim=1)  # (rows, V)
        dz[torch.arange(dz.shape[0], device=dz.device), targets[i:i + rows]] -= 1.0
        dh[i:i + rows] = dz @ w32
        dw.addmm_(dz.T, h32)
    return dh, dw


def _rel_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def peak_and_time(step, h, w):
    """-> (peak MiB allocated beyond what was allocated before one step(), triton.testing.do_bench's median
    ms of step), each from h and w without gradients."""
    from triton.testing import do_bench

    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    h.grad = w.grad = None
    return peak_mib, do_bench(step, grad_to_none=[h, w], return_mode="median")


def run_cuda(args, emit):
    """Forward and forward+backward on the GPU: lmloss (Triton forward and backward) against the
    logits paths, a torch.compile'd matmul + CE, Cut Cross-Entropy and Liger-Kernel (when
    importable). Each method's full-size loss is first checked against a float64 sum, and its
    gradients against float32 ones; time is triton.testing.do_bench's median; memory is the peak
    allocated beyond the inputs (the gradients included, for every method alike)."""
    dtype = getattr(torch, args.dtype)
    methods = cuda_methods(args)
    tol = 1e-4 if dtype == torch.float32 else 2e-3  # relative, on the sum over N tokens
    grad_tol = 1e-3 if dtype == torch.float32 else 2e-2  # relative to the largest entry
    for V in args.vocab:
        hidden, weight, targets = make_inputs(args.N, args.d, V, dtype, "cuda")
        ref = _f64_sum(hidden, weight, targets)
        ref_dh, ref_dw = _f32_grads(hidden, weight, targets) if "fwd+bwd" in args.modes else (None, None)
        logits_mib = args.N * V * dtype.itemsize / 2**20  # in the inputs' dtype, as a model's head makes them
        # every method must also produce dh and dW: allow their float32 accumulators and the returned grads
        grads_mib = (args.N + V) * args.d * (4 + dtype.itemsize) / 2**20
        times = {}
        for name, fn in methods.items():
            for mode in args.modes:
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
                    grad_err = None
                    if mode == "fwd+bwd":
                        grad_err = max(_rel_err(h.grad, ref_dh), _rel_err(w.grad, ref_dw))
                    peak_mib, time_ms = peak_and_time(step, h, w)
                    ok = rel <= tol and (grad_err is None or grad_err <= grad_tol)
                    times[name, mode] = (time_ms, peak_mib, ok)
                    emit(dict(op=f"linear_cross_entropy {mode}", impl=name, dtype=args.dtype, N=args.N,
                              d=args.d, V=V, time_ms_p50=round(time_ms, 3), peak_extra_mib=round(peak_mib, 1),
                              logits_mib=round(logits_mib, 1), grads_allowance_mib=round(grads_mib, 1),
                              rel_err_vs_f64=float(f"{rel:.3g}"),
                              grad_rel_err_vs_f32=None if grad_err is None else float(f"{grad_err:.3g}"),
                              matches=ok))
                except Exception as e:  # one library failing must not hide the others' numbers
                    print(f"  {name} {mode} V={V} failed: {type(e).__name__}: {str(e)[:300]}")
                finally:
                    h = w = None
                    torch.cuda.empty_cache()
        _summary(V, args, times, logits_mib, grads_mib)
        del hidden, weight, targets, ref_dh, ref_dw
        torch.cuda.empty_cache()


def _summary(V, args, times, logits_mib, grads_mib):
    """One line per method and mode: time, ratio to torch.compile, memory beyond the gradients as a
    share of the logits (the issue's budget: 5%)."""
    print(f"--- V={V}, N={args.N}, d={args.d}, {args.dtype}: logits {logits_mib:.0f} MiB, 5% = "
          f"{0.05 * logits_mib:.0f} MiB; allowance for dh, dW (float32 + returned) {grads_mib:.0f} MiB")
    for mode in args.modes:
        base = times.get(("torch.compile(mm+F.ce)", mode))
        for (name, m), (time_ms, peak_mib, ok) in times.items():
            if m != mode:
                continue
            ratio = f"{time_ms / base[0]:.2f}x torch.compile" if base else "no torch.compile baseline"
            beyond = peak_mib - (grads_mib if mode == "fwd+bwd" else 0.0)
            print(f"  {mode:8s} {name:24s} {time_ms:8.2f} ms  {ratio:26s} peak extra {peak_mib:8.1f} MiB, "
                  f"beyond grads {beyond:8.1f} MiB = {100 * beyond / logits_mib:5.1f}% of logits"
                  f"{'' if ok else '  MISMATCH'}")


# The backward's tile configurations timed by --sweep-backward: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages); all compile for sm_90 with Triton 3.9 without spills (ptxas), 229 KiB shared memory at most.
BACKWARD_CONFIGS = [(128, 128, 64, 8, 2), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                    (128, 64, 64, 4, 3), (64, 256, 64, 8, 2), (64, 64, 64, 4, 3)]


# The chunked backward's dz-kernel tiles timed by --sweep-backward chunks (same tuple), and its chunk widths
# as fractions of the vocabulary (each chunk's dz, N x chunk in the inputs' dtype, is the extra memory).
CHUNK_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3),
                 (256, 128, 64, 8, 3), (64, 128, 64, 4, 3)]
CHUNK_DIVISORS = [64, 128]


def sweep_backward(args, emit):
    """Time one of lmloss's Triton backwards alone for each tile configuration and L2 group size (rows,
    "atomic") or chunk width ("chunks"), each first checked against the default configuration's
    gradients."""
    from triton.testing import do_bench

    import lmloss.ops.linear_triton as lt
    import lmloss.ops.linear_triton_chunks as ltc

    dtype = getattr(torch, args.dtype)
    for V in args.vocab:
        hidden, weight, targets = make_inputs(args.N, args.d, V, dtype, "cuda")
        lse, _ = lt.linear_lse_target(hidden, weight, targets)
        g = torch.ones(args.N, device=hidden.device)
        ref_dh, ref_dw, _ = lt.linear_backward(hidden, weight, targets, None, lse, g)
        if args.sweep_backward == "chunks":
            default = ltc.default_chunk_config(hidden)
            runs = [(c, None) for c in [default] + [c for c in CHUNK_CONFIGS if c != default]]
            runs += [(default, max(256, V // k // 256 * 256)) for k in CHUNK_DIVISORS]
            op, fn, knob = "linear_backward_chunks", ltc.linear_backward_chunks, "chunk_cols"
        else:
            default = lt.default_backward_config(hidden, lt.default_precision(hidden))
            runs = [(c, None) for c in [default] + [c for c in BACKWARD_CONFIGS if c != default]]
            runs += [(default, r) for r in (args.N, 2048)]
            op, fn, knob = "linear_backward", lt.linear_backward, "group_rows"
        base_ms = None
        for config, value in runs:
            run = lambda: fn(hidden, weight, targets, None, lse, g, config=config,  # noqa: E731
                             **{knob: value})
            row = dict(op=op, dtype=args.dtype, N=args.N, d=args.d, V=V, config=list(config), **{knob: value})
            try:
                dh, dw, _ = run()
                err = max(_rel_err(dh, ref_dh.float()), _rel_err(dw, ref_dw.float()))
                ms = do_bench(run, return_mode="median")
            except Exception as e:  # a configuration the compiler rejects is a row, not a crash
                emit({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            base_ms = base_ms or ms
            tflops = 3 * 2 * args.N * V * args.d / ms / 1e9
            emit({**row, "time_ms": round(ms, 3), "vs_default": round(base_ms / ms, 3),
                  "tflop_per_s": round(tflops, 1), "rel_diff_vs_default": float(f"{err:.3g}")})
        del hidden, weight, targets, lse, ref_dh, ref_dw
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
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="CUDA: what to time")
    p.add_argument("--methods", nargs="+", help="CUDA: only these methods (names as printed; default all)")
    p.add_argument("--sweep-backward", nargs="?", const="atomic", choices=["atomic", "chunks"],
                   help="CUDA: time a Triton backward's tile configurations instead (default: the atomic one)")
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
    if args.sweep_backward:
        return sweep_backward(args, emit)
    (run_cuda if args.device == "cuda" else run_cpu)(args, emit)


if __name__ == "__main__":
    main()
