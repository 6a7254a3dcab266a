"""float32 linear layers on the CPU through oneDNN, where torch's own float32 GEMM (MKL's sgemm) runs at half speed.

    y = linear(x, weight, bias)      # == torch.nn.functional.linear(x, weight, bias), up to summation order

torch's float32 matrix products on x86 go to MKL's sgemm, and MKL picks its kernels by CPU vendor: on AMD EPYC
(Zen 5, AVX-512) it runs its AVX2 code at 217-222 GFLOP/s on 2 cores, where oneDNN's AVX-512 code, also inside
every torch wheel, runs the same products at 476-512 GFLOP/s (2.2-2.3x; (4096 x 576) @ (576 x 576 / 1536),
scripts/bench_eval.py prints both rates). `torch.ops.mkldnn._linear_pointwise` is that oneDNN product for a
dense float32 input and weight (the op torch.compile's CPU backend emits for nn.Linear); `linear` calls it
where it applies and is F.linear everywhere else (lmloss/ops/cpu_forward.py sends a model's nn.Linear
layers here):
    - CPU, float32 input, weight and bias, the weight contiguous, the bias contiguous (a strided bias gives
      wrong numbers in torch 2.13), at least one input feature;
    - no autograd wanted (evaluation: under torch.no_grad or inference_mode, or no input requiring grad);
    - x86-64 only (where MKL is the alternative); `LMLOSS_ONEDNN=0` turns it off, and so does
      `torch.backends.mkldnn.enabled = False`;
    - `available()` checks once per process that the op exists and reproduces F.linear on values.
The result is float32 accumulated in float32, like MKL's; only the summation order differs (relative
differences ~1e-7 per product; SmolLM2's per-document log-likelihoods on 8 WikiText pages stay within 3.1e-6 of
lm-eval's, as they were with MKL's products; scripts/bench_eval.py checks it in every run).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

_F_LINEAR = torch.nn.functional.linear


def _op():
    return torch.ops.mkldnn._linear_pointwise


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T by oneDNN, unchecked: float32 CPU x (..., K), a contiguous float32 weight (N, K), where
    `enabled()`. For callers that hold those conditions themselves (cpu_attention.py); others call `linear`."""
    return _op()(x, weight, None, "none", [], "")


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(available, a line saying why or why not); decided once per process."""
    if os.environ.get("LMLOSS_ONEDNN", "1") == "0":
        return False, "turned off by LMLOSS_ONEDNN=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not an x86-64 CPU ({platform.machine()}): torch's own float32 GEMM is used"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    try:
        op = _op()
        x = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3) / 7
        w = torch.arange(15, dtype=torch.float32).reshape(5, 3).sin()
        b = torch.arange(5, dtype=torch.float32)
        got = op(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError, TypeError, NotImplementedError) as e:
        return False, f"torch.ops.mkldnn._linear_pointwise is missing or failed on a probe ({type(e).__name__}: {e})"
    want = _F_LINEAR(x.double(), w.double(), b.double())
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5):
        return False, "torch.ops.mkldnn._linear_pointwise did not reproduce F.linear on a probe"
    return True, "float32 linear layers on oneDNN (torch.ops.mkldnn._linear_pointwise)"


def available() -> bool:
    return status()[0]


def enabled() -> bool:
    """available(), and not turned off by the user's torch.backends.mkldnn.enabled = False."""
    return torch.backends.mkldnn.enabled and available()


def applies(x, weight, bias=None) -> bool:
    """Whether linear(x, weight, bias) runs on oneDNN (else it is F.linear)."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.layout != torch.strided or weight.layout != torch.strided or weight.dim() != 2 or x.dim() < 1:
        return False
    if x.shape[-1] == 0 or not weight.is_contiguous() or weight.device.type != "cpu":
        return False
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or bias.dim() != 1
                             or bias.layout != torch.strided or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, shape (..., out): oneDNN's float32 product where `applies`, else F.linear."""
    if not applies(x, weight, bias):
        return _F_LINEAR(x, weight, bias)
    return _op()(x, weight, None if bias is None else bias.contiguous(), "none", [], "")
