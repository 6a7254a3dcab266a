"""Per-position KL divergence between two models' next-token distributions, fused with both models'
target NLL and argmax: one pass over both logits, nothing N x V allocated.

Identities, per row with reference logits zr and model logits z (shifted by their maxima m_r and m):
    lr = zr - m_r,  l = z - m,  s_r = sum(exp(lr)),  s = sum(exp(l)),  a = sum(exp(lr) * (lr - l))
    KL(P_ref || P) = sum_j p_ref_j * (log p_ref_j - log p_j) = a / s_r + log(s / s_r)
    nll_ref = (m_r - zr[t]) + log(s_r),  nll = (m - z[t]) + log(s)
Taken literally in float32 the two terms of KL cancel: for two nearly identical models (KL ~ 1e-6)
each carries an error of ulp(log s) ~ 1e-7 and the difference keeps nothing. So "chunked" and
"reference" compute rows in float64 (the error becomes ~1e-16 nats), and "triton" uses a float32
form that keeps relative precision (lmloss/ops/kl_triton.py derives it).

Conventions, the same for every implementation:
    p_ref_j = 0 (a reference logit of -inf, masked vocabulary) adds 0, whatever z_j is;
    p_ref_j > 0 where z_j = -inf gives KL = inf;
    a row holding NaN or +inf, or all -inf, in either input gives KL = NaN (like log_softmax).
Implementations, chosen by name from KL_IMPLS like token_nll's: "reference" (float64 log_softmax,
slow), "chunked" (CPU, or CUDA without Triton) and "triton" (lmloss/ops/kl_triton.py); "auto" is
choose_impl's rule. Each maps (ref (N, V), logits (N, V), targets (N,) or None, ignore_index) to the
five (N,) tensors of KLTokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmloss.ops._checks import check_logits, check_targets, choose_impl, compute_dtype
from lmloss.ops._threads import parallel_rows

_REFERENCE_BLOCK_ELEMENTS = 1 << 22  # 32 MiB of float64 per block
# Three float64 (rows, V) buffers per thread; 1 MiB each keeps a block in this machine's L2 + L3 share
# while torch's kernels make their passes over it. On CUDA (no Triton) a block is a few big launches.
_CPU_BLOCK_BYTES = 1 << 20
_CUDA_BLOCK_BYTES = 256 << 20


class KLTokens(NamedTuple):
    """Per-position results of token_kl, each shaped like the logits without their last dim."""

    kl: torch.Tensor  # KL(P_ref || P) in nats, float32 (float64 if an input is float64), >= 0
    nll_ref: torch.Tensor  # -log P_ref[target], same dtype; 0.0 where the target is ignored or targets is None
    nll: torch.Tensor  # -log P[target]; 0.0 where ignored or targets is None
    argmax_ref: torch.Tensor  # int64, first index of the maximum of the reference logits
    argmax: torch.Tensor  # int64, first index of the maximum of the model logits


def token_kl(ref_logits, logits, targets=None, *, ignore_index: int = -100, impl: str = "auto") -> KLTokens:
    """KL(P_ref || P) per position in nats, with both models' target NLL and argmax. Same as
        lp_ref, lp = F.log_softmax(ref_logits.double(), -1), F.log_softmax(logits.double(), -1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)         # (...,), rounded to float32
        nll_ref, nll = -lp_ref.gather(-1, t), -lp.gather(-1, t)  # 0.0 where targets == ignore_index
    in one pass over both logits, never materializing log-probabilities.

    ref_logits and logits (..., V): the same shape (the models must share a vocabulary), any strides,
    any float dtypes, which may differ (a float32 reference against a bfloat16 model). targets (...)
    int64, or None: then nll_ref and nll are not computed and come back as zeros. Outputs are shaped
    like the leading dims. kl is clamped at 0 (rounding can give -1e-17); see the module docstring for
    -inf, NaN and +inf logits. Not differentiable (runs under no_grad); never writes to its inputs.
    """
    _check_pair(ref_logits, logits)
    if targets is not None:
        check_targets(logits, targets, ignore_index)
    kl_impl = KL_IMPLS[choose_impl(impl, logits.device, KL_IMPLS)]
    lead = logits.shape[:-1]
    flat_targets = None if targets is None else targets.reshape(-1)
    parts, start = [], 0
    with torch.no_grad():
        for ref_rows, rows in _paired_row_views(ref_logits, logits):
            n = rows.shape[0]
            t = None if flat_targets is None else flat_targets[start:start + n]
            parts.append(kl_impl(ref_rows, rows, t, int(ignore_index)))
            start += n
    fields = parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts)]
    return KLTokens(*(f.view(lead) for f in fields))


def _check_pair(ref_logits, logits) -> None:
    for name, x in (("ref_logits", ref_logits), ("logits", logits)):
        try:
            check_logits(x)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    if ref_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} have different vocabulary "
            f"sizes ({ref_logits.shape[-1]} vs {logits.shape[-1]}): KL per position needs two models that share "
            "a vocabulary (tokenizer); to compare models with different tokenizers, compare bits per byte"
        )
    if ref_logits.shape != logits.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} must have the same shape "
            "(..., V): both models share a vocabulary and are scored on the same positions; slice both the same way"
        )
    if ref_logits.device != logits.device:
        raise ValueError(
            f"ref_logits are on {ref_logits.device} but logits on {logits.device}; move them to one device")


def _paired_row_views(a: torch.Tensor, b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of 2-D (rows, V) views covering a's and b's rows in the same order, never a copy; like
    row_views, split over the first dim where either cannot be viewed as (rows, V)."""
    V = a.shape[-1]
    if a.dim() <= 2:
        return [(a.reshape(-1, V), b.reshape(-1, V))]  # views for <= 2 dims
    try:
        return [(a.view(-1, V), b.view(-1, V))]
    except RuntimeError:
        return [pair for ai, bi in zip(a.unbind(0), b.unbind(0)) for pair in _paired_row_views(ai, bi)]


def _out_dtype(ref: torch.Tensor, logits: torch.Tensor) -> torch.dtype:
    return compute_dtype(torch.promote_types(ref.dtype, logits.dtype))


def _finish(kl, m_r, m, log_s_r, log_s, zr_t, z_t, valid, out_dtype):
    """Per-row float64 results -> KLTokens fields (without the argmaxes): NaN for rows without a
    finite maximum in either input, kl clamped at 0, nll = (max - z[t]) + log(s), 0.0 where not valid."""
    finite = torch.isfinite(m_r) & torch.isfinite(m)
    kl = torch.where(finite, kl, float("nan")).clamp_(min=0.0)  # clamp keeps NaN
    nll_ref = torch.where(valid, (m_r - zr_t) + log_s_r, 0.0)
    nll = torch.where(valid, (m - z_t) + log_s, 0.0)
    return kl.to(out_dtype), nll_ref.to(out_dtype), nll.to(out_dtype)


def _target_logits(ref, logits, targets, ignore_index):
    """(zr[t], z[t], valid) per row in float64; zeros and all-False without targets."""
    N = ref.shape[0]
    if targets is None:
        zeros = torch.zeros(N, dtype=torch.float64, device=ref.device)
        return zeros, zeros, torch.zeros(N, dtype=torch.bool, device=ref.device)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1)
    return ref.gather(1, tcol)[:, 0].double(), logits.gather(1, tcol)[:, 0].double(), valid


def reference_kl(ref, logits, targets, ignore_index):
    """The definition in float64, block by block: log_softmax both, sum p_ref * (lp_ref - lp)."""
    N, V = ref.shape
    kl, lse_r, lse = (torch.empty(N, dtype=torch.float64, device=ref.device) for _ in range(3))
    m_r, m = ref.amax(1).double(), logits.amax(1).double()
    step = max(1, _REFERENCE_BLOCK_ELEMENTS // V)
    for s in range(0, N, step):
        e = min(s + step, N)
        zr, z = ref[s:e].double(), logits[s:e].double()  # (b, V)
        lp_ref, lp = torch.log_softmax(zr, 1), torch.log_softmax(z, 1)
        p_ref = lp_ref.exp()
        kl[s:e] = torch.where(p_ref > 0, p_ref * (lp_ref - lp), 0.0).sum(1)  # p_ref = 0 adds 0
        lse_r[s:e], lse[s:e] = torch.logsumexp(zr, 1), torch.logsumexp(z, 1)
    zr_t, z_t, valid = _target_logits(ref, logits, targets, ignore_index)
    # (m - z[t]) + log(s) with log(s) = lse - m: the same nll as lse - z[t], written like the others
    kl, nll_ref, nll = _finish(kl, m_r, m, lse_r - m_r, lse - m, zr_t, z_t, valid, _out_dtype(ref, logits))
    return kl, nll_ref, nll, ref.argmax(1), logits.argmax(1)


def chunked_kl(ref, logits, targets, ignore_index):
    """Blocks of rows in float64, a few torch ops per cache-resident block:
    1. m, argmax = max(z) per input;  2. lr = zr - m_r, l = z - m, d = lr - l (float64);
    3. s_r = sum(exp(lr)), s = sum(exp(l)), a = nansum(exp(lr) * d): exp(lr) = 0 against d = -inf or
       NaN (masked vocabulary) is the only NaN there; a NaN or +inf logit reaches s_r or s instead."""
    N, V = ref.shape
    dev = ref.device
    budget = _CUDA_BLOCK_BYTES if ref.is_cuda else _CPU_BLOCK_BYTES
    B = max(1, min(N, budget // (V * 8)))
    max_r, max_m = torch.empty(N, dtype=ref.dtype, device=dev), torch.empty(N, dtype=logits.dtype, device=dev)
    argmax_r, argmax_m = (torch.empty(N, dtype=torch.int64, device=dev) for _ in range(2))
    s_r, s, a = (torch.empty(N, dtype=torch.float64, device=dev) for _ in range(3))

    def rows(start, end):
        er, q, d = (torch.empty(B, V, dtype=torch.float64, device=dev) for _ in range(3))  # reused per block
        for i in range(start, end, B):
            j, b = min(i + B, end), min(B, end - i)
            torch.max(ref[i:j], 1, out=(max_r[i:j], argmax_r[i:j]))  # 1. first index of the max
            torch.max(logits[i:j], 1, out=(max_m[i:j], argmax_m[i:j]))
            lr = torch.sub(ref[i:j], max_r[i:j, None].double(), out=er[:b])  # 2. float64 from here
            l = torch.sub(logits[i:j], max_m[i:j, None].double(), out=q[:b])
            diff = torch.sub(lr, l, out=d[:b])
            torch.sum(lr.exp_(), 1, out=s_r[i:j])  # 3.
            torch.sum(l.exp_(), 1, out=s[i:j])
            torch.nansum(diff.mul_(lr), 1, out=a[i:j])

    parallel_rows(rows, N, B, dev)
    zr_t, z_t, valid = _target_logits(ref, logits, targets, ignore_index)
    log_s_r, log_s = s_r.log(), s.log()
    kl = a / s_r + (log_s - log_s_r)
    kl, nll_ref, nll = _finish(kl, max_r.double(), max_m.double(), log_s_r, log_s, zr_t, z_t, valid,
                               _out_dtype(ref, logits))
    return kl, nll_ref, nll, argmax_r, argmax_m


def _triton_kl(ref, logits, targets, ignore_index):
    try:
        from lmloss.ops import kl_triton
    except ImportError as e:
        raise ImportError(
            f"impl='triton' needs triton ({e}); pip install 'lmloss[triton]', or use impl='chunked'") from e
    return kl_triton.token_kl(ref, logits, targets, ignore_index)


KL_IMPLS = {"reference": reference_kl, "chunked": chunked_kl, "triton": _triton_kl}
