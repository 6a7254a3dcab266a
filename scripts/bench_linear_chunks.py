"""The chunked Triton backward of the fused linear cross-entropy (lmloss/ops/linear_triton_chunks.py) at
several chunk widths: its GPU time against the host's time per call, alone and in forward+backward through
autograd, beside torch.compile(mm + F.cross_entropy) in the same run. CUDA only.

    python scripts/bench_linear_chunks.py                      # bf16, N=8192, d=768, V=50257 and 262144
    python scripts/bench_linear_chunks.py --divisors 32 16     # lmloss's default, then about V/32, V/16 entries
    python scripts/bench_linear_chunks.py --divisors 16 --parts --dz-kernels tiles clamped persistent
                                # + the backward's parts and kernel profile; each form of the dz kernel

The backward runs a Python loop over vocabulary chunks: per chunk one Triton launch and two or three cuBLAS
calls. When the host's time per chunk exceeds the chunk's GPU time, the GPU waits for the host, and the
backward's time is the host's. The first row is lmloss's default width (default_chunk_cols), then one row per
divisor k (about V / k entries, rounded down to the tile width). Per width the script prints:
  gpu ms       triton.testing.do_bench's median of the backward alone (lse and g given)
  dz ms        the same for the dz kernels alone (want_h=False, want_w=False)
  host ms      wall time of the Python call until it returns, after a synchronize, without waiting for the
               GPU (median of 10): near gpu ms means host-bound
  dz-only host the same with want_h=False, want_w=False (the Triton launches and the loop alone)
  fwd+bwd ms   lmloss.linear_cross_entropy(..., reduction="sum").backward(), do_bench median
  peak MiB     peak allocated beyond the inputs in that forward+backward (returned gradients included), and
               the dz buffer (N x cols in the inputs' dtype) as a share of the logits (issue #14: under 5%)
and torch.compile's forward+backward on the same inputs, and the ratio.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lmloss
import lmloss.ops.linear_triton as lt
import lmloss.ops.linear_triton_chunks as ltc
from bench_linear_nll import _rel_err, make_inputs, peak_and_time


def _host_ms(fn, reps=10):
    """Median wall time of fn() until it returns, the GPU idle at each start (synchronized first)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _fwd_bwd(fn, h, w, t):
    def step():
        loss = fn(h, w, t)
        loss.backward()
        return loss
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--vocab", type=int, nargs="+", default=[50257, 262144])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--divisors", type=int, nargs="+", default=[32, 24, 16, 12, 8],
                   help="chunk widths of about V / k vocabulary entries (rounded down to the tile width), "
                        "timed after lmloss's default width")
    p.add_argument("--dz-kernels", nargs="+", default=None, choices=ltc.DZ_KERNELS,
                   help="forms of the dz kernel (linear_triton_chunks.DZ_KERNEL), each timed at every width "
                        "(default: lmloss's own)")
    p.add_argument("--parts", action="store_true",
                   help="also time the default width's backward without dh's product, without dW's, and with "
                        "neither (the dz kernels alone), and a kernel profile of it")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    args = p.parse_args()
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lmloss {lmloss.__version__}; "
          f"{args.dtype}, N={args.N}, d={args.d}")
    compiled = None if args.no_compile else torch.compile(
        lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum"))
    lmloss_sum = lambda h, w, t: lmloss.linear_cross_entropy(h, w, t, reduction="sum")  # noqa: E731
    default_cols, default_form = ltc.default_chunk_cols, ltc.DZ_KERNEL
    for V in args.vocab:
        hidden, weight, targets = make_inputs(args.N, args.d, V, dtype, "cuda")
        logits_mib = args.N * V * dtype.itemsize / 2**20
        lse, _ = lt.linear_lse_target(hidden, weight, targets)
        g = torch.ones(args.N, device=hidden.device)
        block_n = ltc.default_chunk_config(hidden)[1]
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        base_ms = None
        if compiled is not None:
            t0 = time.perf_counter()
            _fwd_bwd(compiled, h, w, targets)()
            compile_s = time.perf_counter() - t0
            ref_dh, ref_dw = h.grad.float(), w.grad.float()
            h.grad = w.grad = None
            base_ms = do_bench(_fwd_bwd(compiled, h, w, targets), grad_to_none=[h, w], return_mode="median")
            print(f"--- V={V}: torch.compile(mm+F.ce) fwd+bwd {base_ms:.2f} ms (compiled in {compile_s:.1f} s); "
                  f"logits {logits_mib:.0f} MiB")
        else:
            ref_dh = ref_dw = None
            print(f"--- V={V}: logits {logits_mib:.0f} MiB")
        if args.parts:
            def part(**kw):
                return ltc.linear_backward_chunks(hidden, weight, targets, None, lse, g, **kw)
            ms = {name: do_bench(lambda kw=kw: part(**kw), return_mode="median") for name, kw in (
                ("all", {}), ("no dh", dict(want_h=False)), ("no dW", dict(want_w=False)),
                ("dz only", dict(want_h=False, want_w=False)))}
            print(f"  parts, default width: whole {ms['all']:.2f} ms; dz kernels {ms['dz only']:.2f}, "
                  f"+dW {ms['no dh'] - ms['dz only']:.2f}, +dh {ms['no dW'] - ms['dz only']:.2f} ms")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    part()
                torch.cuda.synchronize()
            print("  the GPU's kernels in 3 backward calls (torch.profiler; names say the tiles cuBLAS chose):")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=90))
        print(f"  {'width':>7s} {'dz kernel':>10s} {'cols':>6s} {'chunks':>6s} {'gpu ms':>8s} {'dz ms':>6s} {'host ms':>8s} {'dz-only host':>12s} "
              f"{'host/chunk':>10s} {'fwd+bwd ms':>10s} {'vs compile':>10s} {'peak MiB':>9s} {'dz % logits':>11s}"
              f" {'grad err':>9s}")
        try:
            for k, form in [(k, f) for k in [None] + args.divisors for f in args.dz_kernels or [default_form]]:
                cols = (default_cols(args.N, V, block_n) if k is None
                        else min(V, max(block_n, V // k // block_n * block_n)))
                ltc.default_chunk_cols = lambda N, V, block_n, cols=cols: cols  # noqa: E731 (for autograd's call)
                ltc.DZ_KERNEL = form
                chunks = -(-V // cols)

                def bwd(**kw):
                    return ltc.linear_backward_chunks(hidden, weight, targets, None, lse, g, **kw)
                gpu_ms = do_bench(bwd, return_mode="median")
                dz_ms = do_bench(lambda: bwd(want_h=False, want_w=False), return_mode="median")
                host_ms = _host_ms(bwd)
                dz_host_ms = _host_ms(lambda: bwd(want_h=False, want_w=False))
                step = _fwd_bwd(lmloss_sum, h, w, targets)
                h.grad = w.grad = None  # do_bench leaves its last run's gradients
                step()
                err = None if ref_dh is None else max(_rel_err(h.grad, ref_dh), _rel_err(w.grad, ref_dw))
                peak_mib, ms = peak_and_time(step, h, w)
                ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
                dz_share = 100 * args.N * cols * dtype.itemsize / 2**20 / logits_mib
                label = "default" if k is None else f"V/{k}"
                print(f"  {label:>7s} {form:>10s} {cols:6d} {chunks:6d} {gpu_ms:8.2f} {dz_ms:6.2f} {host_ms:8.2f} {dz_host_ms:12.2f} "
                      f"{1e3 * host_ms / chunks:8.0f}us {ms:10.2f} {ratio:>10s} {peak_mib:9.1f} {dz_share:10.1f}%"
                      f" {'-' if err is None else f'{err:.2g}':>9}")
        finally:
            ltc.default_chunk_cols, ltc.DZ_KERNEL = default_cols, default_form
        hidden = weight = targets = h = w = lse = ref_dh = ref_dw = None  # freed before the next size's inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
