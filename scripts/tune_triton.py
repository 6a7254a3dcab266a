"""Time the Triton kernels' tile configurations on a CUDA GPU, each checked against the default's output.

    python scripts/tune_triton.py                 # token_nll (N=8192, V=50257) and linear (N=8192, d=768)
    python scripts/tune_triton.py --out tune.jsonl
    python scripts/tune_triton.py --kernels linear --dtypes bfloat16   # the fused linear forward's bf16 tiles only

For each configuration the script passes it to the kernel's launcher as data (`config=`, and
`precision=` for the linear kernel; nothing in lmloss is replaced), checks that the result equals the
default configuration's to float32 rounding (and the float64 reference on 64 rows), and times the
launcher with triton.testing.do_bench (median). It prints one row per configuration with the time
relative to the current default, measured in the same run, and the achieved rate: GB/s of logits
read for token_nll, TFLOP/s of the matrix product for the linear kernel. It changes nothing:
copy a better configuration into lmloss/ops by hand, with the numbers.
"""
import argparse
import json
import time

import torch

import lmloss
import lmloss.ops.linear_triton as lt
import lmloss.ops.triton_kernels as tk

TOKEN_CONFIGS = [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if not (b == 1024 and w == 16)]
LINEAR_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    torch.bfloat16: [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                     (64, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4),
                     (256, 128, 64, 8, 4), (256, 128, 128, 8, 2), (256, 64, 64, 8, 3), (128, 256, 64, 8, 4)],
    torch.float32: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3),
                    (64, 128, 32, 8, 3)],
}


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, return_mode="median")


def tune_token(N, V, dtype, emit, *, device="cuda"):
    logits = (torch.randn(N, V, device=device) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    targets[::17] = -100
    run = lambda config: tk.nll_lse(logits, targets, -100, config=config)[0]  # noqa: E731
    ref_nll = lmloss.token_nll(logits, targets, impl="triton")  # the public path, default configuration
    f64 = torch.nn.functional.cross_entropy(logits[:64].double(), targets[:64], reduction="none")
    torch.testing.assert_close(ref_nll[:64].double(), f64, rtol=1e-5, atol=1e-4)
    default = tk.default_config(V)
    base_ms = None
    for config in [default] + [c for c in TOKEN_CONFIGS if c != default]:
        try:
            got = run(config)
            ok = torch.allclose(got, ref_nll, rtol=1e-6, atol=1e-5)
            ms = _bench(lambda: run(config))
        except Exception as e:  # a configuration the compiler rejects is a row, not a crash
            emit(dict(kernel="token_nll", dtype=str(dtype), N=N, V=V, config=list(config),
                      error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        base_ms = base_ms or ms
        emit(dict(kernel="token_nll", dtype=str(dtype), N=N, V=V, config=list(config), ok=ok,
                  time_ms=round(ms, 4), vs_default=round(base_ms / ms, 3),
                  gb_per_s=round(N * V * logits.element_size() / ms / 1e6, 1)))


def tune_linear(N, d, V, dtype, emit, *, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, d, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, d, device=device, generator=g) * (3 / d**0.5)).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=g)

    def run(config, precision):  # (N,) nll = lse - z[target]; no target is ignored here
        lse, target_logit = lt.linear_lse_target(hidden, weight, targets, config=config, precision=precision)
        return (lse - target_logit).float()  # lse is float64, the public nll float32

    ref = lmloss.linear_token_nll(hidden, weight, targets, impl="triton")  # the public path, defaults
    f64 = torch.nn.functional.cross_entropy(hidden[:64].double() @ weight.double().T, targets[:64],
                                            reduction="none")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ref[:64].double(), f64, rtol=tol, atol=tol)
    precision = lt.default_precision(hidden)
    first = lt.default_config(hidden, precision)
    trials = [(precision, first)] + [(precision, c) for c in LINEAR_CONFIGS[dtype] if c != first]
    if dtype == torch.float32 and precision != "ieee":  # fp32 FMAs against three tf32 products (Ampere on)
        trials += [("ieee", c) for c in ((128, 128, 32, 8, 3), (64, 128, 32, 8, 3))]
    base_ms = None
    for prec, config in trials:
        try:
            got = run(config, prec)
            ok = torch.allclose(got, ref, rtol=1e-4, atol=1e-3)
            ms = _bench(lambda: run(config, prec))
        except Exception as e:
            emit(dict(kernel="linear_token_nll", dtype=str(dtype), N=N, d=d, V=V, config=list(config),
                      precision=prec, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        base_ms = base_ms or ms
        emit(dict(kernel="linear_token_nll", dtype=str(dtype), N=N, d=d, V=V, config=list(config), ok=ok,
                  precision=prec,
                  max_rel_err_f64=round(float(((got[:64].double() - f64).abs() / f64.abs()).max()), 8),
                  time_ms=round(ms, 4), vs_default=round(base_ms / ms, 3),
                  tflop_per_s=round(2 * N * d * V / ms / 1e9, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--out", help="append one JSON row per configuration to this file")
    p.add_argument("--kernels", nargs="+", default=["linear", "token"], choices=["linear", "token"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_triton.py needs a CUDA GPU")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)

    def emit(row):
        row = {**row, **meta, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    dtypes = [getattr(torch, name) for name in args.dtypes]
    for dtype in dtypes if "linear" in args.kernels else []:
        tune_linear(args.N, args.d, args.V, dtype, emit)
    for dtype in dtypes if "token" in args.kernels else []:
        tune_token(args.N, args.V, dtype, emit)


if __name__ == "__main__":
    main()
