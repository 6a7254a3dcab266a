"""Interchangeable implementations of one contract: per-token NLL from logits, and its gradient.

Every implementation provides
    nll_lse(logits (N, V), targets (N,), ignore_index) -> (nll (N,), lse (N,))
    grad_logits(logits, targets, lse, grad_nll, out (N, V)) -> out = (softmax - onehot) * grad_nll
(nll in float32, float64 for float64 logits; lse in float64, saved for backward) and is chosen by
name from IMPLS: "reference" (float64, slow), "chunked" (eager torch ops: CPU, or CUDA without Triton),
"native" (CPU: one C loop per row, built once per machine; native.py), "triton" (CUDA). "auto" is "triton"
for CUDA tensors when triton is installed, "native" for CPU tensors when it builds, else "chunked". The functions
below handle validation, (..., V) shapes and strides, autograd and reductions for all of them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from lmloss.ops import chunked, native, reference
from lmloss.ops._checks import (check_logits, check_reduction, check_targets, choose_impl, compute_dtype, reduce_nll,
                                row_views)


class Impl(NamedTuple):
    nll_lse: Callable
    grad_logits: Callable


def _triton_nll_lse(logits, targets, ignore_index):
    return _import_triton_kernels().nll_lse(logits, targets, ignore_index)


def _triton_grad_logits(logits, targets, lse, grad_nll, out):
    return _import_triton_kernels().grad_logits(logits, targets, lse, grad_nll, out)


def _import_triton_kernels():
    try:
        from lmloss.ops import triton_kernels
    except ImportError as e:
        raise ImportError(f"impl='triton' needs triton ({e}); pip install 'lmloss[triton]', or use impl='chunked'") from e
    return triton_kernels


IMPLS = {
    "reference": Impl(reference.nll_lse, reference.grad_logits),
    "chunked": Impl(chunked.nll_lse, chunked.grad_logits),
    "native": Impl(native.nll_lse, native.grad_logits),
    "triton": Impl(_triton_nll_lse, _triton_grad_logits),
}


def _resolve(impl: str, logits: torch.Tensor) -> Impl:
    return IMPLS[choose_impl(impl, logits.device, IMPLS)]


def _forward(impl: Impl, logits, targets, ignore_index):
    """Run impl.nll_lse over the 2-D row views of logits (..., V); returns flat (N,) nll and lse."""
    flat_targets = targets.reshape(-1)
    nlls, lses, start = [], [], 0
    for rows in row_views(logits):
        n = rows.shape[0]
        nll, lse = impl.nll_lse(rows, flat_targets[start:start + n], ignore_index)
        nlls.append(nll)
        lses.append(lse)
        start += n
    if len(nlls) == 1:
        return nlls[0], lses[0]
    return torch.cat(nlls), torch.cat(lses)


def _backward(impl: Impl, logits, flat_targets, lse, grad_nll):
    """(softmax - onehot) * grad_nll, shaped and typed like logits, written view by view."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
    grad_rows = grad.view(-1, logits.shape[-1])
    start = 0
    for rows in row_views(logits):
        n = rows.shape[0]
        s = slice(start, start + n)
        impl.grad_logits(rows, flat_targets[s], lse[s], grad_nll[s], grad_rows[s])
        start += n
    return grad


class _TokenNLL(torch.autograd.Function):
    """nll = lse - x[t]; saves (logits, targets, lse), so nothing N x V beyond the caller's logits."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, impl):
        nll, lse = _forward(impl, logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.impl = ignore_index, impl
        return nll.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_nll):
        logits, targets, lse = ctx.saved_tensors
        flat_targets = targets.reshape(-1)
        g = torch.where(flat_targets != ctx.ignore_index, grad_nll.reshape(-1), 0.0)  # ignored: constant 0
        return _backward(ctx.impl, logits, flat_targets, lse, g), None, None, None


class _LogSumExp(torch.autograd.Function):
    """lse = log(sum(exp(x))) per row; d lse / d x = softmax(x) = exp(x - lse)."""

    @staticmethod
    def forward(ctx, logits, impl):
        no_targets = torch.full(logits.shape[:-1], -1, dtype=torch.int64, device=logits.device)
        _, lse = _forward(impl, logits, no_targets, -1)
        ctx.save_for_backward(logits, lse)
        ctx.impl = impl
        return lse.to(compute_dtype(logits.dtype)).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse = ctx.saved_tensors
        no_onehot = torch.full((lse.numel(),), -1, dtype=torch.int64, device=lse.device)
        return _backward(ctx.impl, logits, no_onehot, lse, grad_lse.reshape(-1)), None


def token_nll(logits, targets, *, ignore_index: int = -100, impl: str = "auto") -> torch.Tensor:
    """Per-token negative log-likelihood in nats. Same as
    F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none"),
    without materializing log-probabilities. logits (..., V) float32/bfloat16/float16, any strides;
    targets (...) int64 -> (...) float32 (float64 for float64 logits), 0.0 where ignored.
    Differentiable; never writes to its inputs.
    """
    check_targets(logits, targets, ignore_index)
    return _TokenNLL.apply(logits, targets, int(ignore_index), _resolve(impl, logits))


def cross_entropy(logits, targets, *, ignore_index: int = -100, reduction: str = "mean",
                  impl: str = "auto") -> torch.Tensor:
    """Drop-in for F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=..., reduction=...)
    with the class dim last: logits (..., V), targets (...) int64. "mean" divides the summed NLL by the
    number of non-ignored targets (NaN when all are ignored, like torch); "sum"; "none" is token_nll.
    The loss is float32; the gradient comes back in logits' dtype, computed from the saved per-row
    log-sum-exp by a fused backward.
    """
    check_reduction(reduction)
    return reduce_nll(token_nll(logits, targets, ignore_index=ignore_index, impl=impl), targets, ignore_index,
                      reduction)


def logsumexp(logits, *, impl: str = "auto") -> torch.Tensor:
    """Per-row log-sum-exp in float32 (float64 for float64 logits): torch.logsumexp(logits.float(), dim=-1),
    one fused pass, differentiable (its gradient is softmax). For a z-loss: (logsumexp(logits) ** 2).mean().
    """
    check_logits(logits)
    return _LogSumExp.apply(logits, _resolve(impl, logits))
