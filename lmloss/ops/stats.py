"""One-pass token statistics: per token NLL, entropy of the predicted distribution, rank of the
target and the argmax, from logits (..., V) read once.

Identities, per row z with m = max(z), d = z - m, s = sum(exp(d)), a = sum(exp(d) * d):
    nll     = lse - z[t]                  = (m - z[t]) + log(s)     both terms >= 0
    entropy = -sum(p * log p) = lse - E_p[z] = log(s) - a / s       both terms >= 0 (a <= 0)
    rank    = #{j : z[j] > z[t]}          0: the target is top-1; logits that tie it do not count
    argmax  = min{j : z[j] = m}           the first index of the maximum, like torch.argmax
Every sum adds terms of one sign and nothing is subtracted from lse, so float32 keeps its relative
precision even for logits of magnitude 1e4 (H = lse - E_p[z] taken literally would lose ulp(lse)).
A logit of -inf (masked vocabulary) has p = 0 and adds nothing: exp(d) * d is taken as 0 there.

Implementations, chosen by name from STATS_IMPLS like token_nll's: "reference" (float64, slow),
"chunked" (CPU, or CUDA without Triton) and "triton" (lmloss/ops/stats_triton.py); "auto" is
choose_impl's rule. Each maps (logits (N, V), targets (N,), ignore_index) -> four (N,) tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmloss.ops._checks import check_targets, choose_impl, compute_dtype, row_views
from lmloss.ops._threads import parallel_rows
from lmloss.ops.chunked import _block_rows

# exp(d) underflows to 0 far above this in float32 and float64: clamping d here turns a masked
# logit's exp(-inf) * -inf = NaN into 0 * -1e4 = 0 and changes nothing else.
_D_FLOOR = -1e4
_REFERENCE_BLOCK_ELEMENTS = 1 << 22  # 32 MiB of float64 per block


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like the targets."""

    nll: torch.Tensor  # nats, float32 (float64 for float64 logits); 0.0 where the target is ignored
    entropy: torch.Tensor  # nats, same dtype; computed for ignored targets too
    rank: torch.Tensor  # int64, #logits strictly above the target's; -1 where ignored
    argmax: torch.Tensor  # int64, first index of the row's maximum; computed for ignored targets too


def token_stats(logits, targets, *, ignore_index: int = -100, impl: str = "auto") -> TokenStats:
    """NLL, entropy, target rank and argmax per token, from one read of the logits. Same as
        logp = F.log_softmax(logits.double(), -1); z_t = logits.gather(-1, targets[..., None])[..., 0]
        TokenStats(-logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1),
                   (logits > z_t[..., None]).sum(-1), logits.argmax(-1))
    rounded to float32 (float64 for float64 logits). logits (..., V) float32/bfloat16/float16/float64,
    any strides; targets (...) int64 in [0, V) or ignore_index. Ignored targets get nll 0.0 and rank -1;
    their entropy and argmax are still computed (they do not depend on the target). A row holding NaN
    (or +inf) gets NaN nll and entropy, as in token_nll; its rank and argmax are then unspecified.
    Not differentiable (runs under no_grad); never writes to its inputs.
    """
    check_targets(logits, targets, ignore_index)
    rows_fn = STATS_IMPLS[choose_impl(impl, logits.device, STATS_IMPLS)]
    flat_targets = targets.reshape(-1)
    parts, start = [], 0
    with torch.no_grad():
        for rows in row_views(logits):
            n = rows.shape[0]
            parts.append(rows_fn(rows, flat_targets[start:start + n], int(ignore_index)))
            start += n
    cols = parts[0] if len(parts) == 1 else [torch.cat(c) for c in zip(*parts)]
    return TokenStats(*(c.view(targets.shape) for c in cols))


def _finish(nll, entropy, rank, argmax, valid):
    """Ignored targets: nll 0.0 and rank -1."""
    return TokenStats(torch.where(valid, nll, 0.0), entropy, torch.where(valid, rank, -1), argmax)


def reference_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> TokenStats:
    """The definition in float64, block by block: logits (N, V), targets (N,) -> TokenStats of (N,)."""
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1)
    out = TokenStats(torch.empty(N, dtype=cdt, device=logits.device), torch.empty(N, dtype=cdt, device=logits.device),
                     torch.empty(N, dtype=torch.int64, device=logits.device),
                     torch.empty(N, dtype=torch.int64, device=logits.device))
    step = max(1, _REFERENCE_BLOCK_ELEMENTS // V)
    for s in range(0, N, step):
        x = logits[s:s + step].double()  # (b, V)
        logp = torch.log_softmax(x, dim=1)
        x_t = x.gather(1, tcol[s:s + step])  # (b, 1)
        out.nll[s:s + step] = -logp.gather(1, tcol[s:s + step])[:, 0]
        out.entropy[s:s + step] = torch.special.entr(logp.exp()).sum(dim=1)  # entr(p) = -p log p, 0 at p = 0
        out.rank[s:s + step] = (x > x_t).sum(dim=1)
        out.argmax[s:s + step] = x.argmax(dim=1)
    return _finish(*out, valid)


def chunked_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> TokenStats:
    """logits (N, V), targets (N,) -> TokenStats of (N,). Rows in cache-sized blocks (chunked.py's
    sizes), each block read from memory once and then passed over in cache by a few torch ops;
    one contiguous range of rows per intra-op thread (parallel_rows)."""
    N, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    dev = logits.device
    B = _block_rows(logits, torch.finfo(cdt).bits // 8)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1), column 0 stands in for ignored rows
    nll, entropy = torch.empty(N, dtype=cdt, device=dev), torch.empty(N, dtype=cdt, device=dev)
    rank, argmax = torch.empty(N, dtype=torch.int64, device=dev), torch.empty(N, dtype=torch.int64, device=dev)

    def rows(start, end):
        upcast = torch.empty(B, V, dtype=cdt, device=dev) if logits.dtype != cdt else None
        d_buf, p_buf = torch.empty(B, V, dtype=cdt, device=dev), torch.empty(B, V, dtype=cdt, device=dev)
        for s in range(start, end, B):
            e = min(s + B, end)
            b = e - s
            x = logits[s:e] if upcast is None else upcast[:b].copy_(logits[s:e])  # (b, V), cdt
            m, argmax[s:e] = _max_argmax(x)  # 1. row max and its first index
            x_t = x.gather(1, tcol[s:e])  # (b, 1)
            rank[s:e] = _count_above(x, x_t, p_buf[:b])  # 2. logits strictly above the target's
            d = torch.sub(x, m[:, None], out=d_buf[:b]).clamp_min_(_D_FLOOR)  # 3. d = z - m <= 0
            p = torch.exp(d, out=p_buf[:b])  # unnormalized probabilities
            sum_p = p.sum(dim=1)
            a = torch.linalg.vecdot(p, d)  # 4. a = sum(exp(d) * d) <= 0
            log_s = sum_p.log()
            nll[s:e] = (m - x_t[:, 0]) + log_s
            entropy[s:e] = log_s - a / sum_p

    parallel_rows(rows, N, B, dev)
    return _finish(nll, entropy, rank, argmax, valid)


def _max_argmax(x: torch.Tensor, chunk: int = 256):
    """(max, first index of the max) per row of x (b, V), like torch.max(x, dim=1) but 10x faster on
    the CPU, where max-with-index is a scalar loop: the vectorized amax of every `chunk` columns,
    then the first chunk holding the row max, then torch.argmax inside that chunk only."""
    b, V = x.shape
    if x.stride(1) != 1 or V < 2 * chunk:
        return torch.max(x, dim=1)
    n_full = V // chunk
    chunk_max = x[:, :n_full * chunk].view(b, n_full, chunk).amax(dim=2)  # (b, n_full)
    if V % chunk:
        chunk_max = torch.cat([chunk_max, x[:, n_full * chunk:].amax(dim=1, keepdim=True)], dim=1)
    m = chunk_max.amax(dim=1)
    first = (chunk_max == m[:, None]).to(torch.int32).argmax(dim=1)  # (b,), first chunk holding m
    cols = (first[:, None] * chunk + torch.arange(chunk, device=x.device)).clamp_max_(V - 1)  # (b, chunk)
    within = x.gather(1, cols).argmax(dim=1, keepdim=True)  # clamped repeats of column V-1 come last
    return m, cols.gather(1, within)[:, 0]


def _count_above(x: torch.Tensor, x_t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """#(x > x_t) per row as int64. The comparison is written as 0.0/1.0 into the float buffer buf
    (b, V) and summed there: 4x faster on the CPU than a bool tensor's sum, and exact while V < 2**24
    (sums of ones stay integers in float32)."""
    if x.shape[1] >= 1 << 24:
        return (x > x_t).sum(dim=1)
    return torch.gt(x, x_t, out=buf).sum(dim=1).long()


def _triton_rows(logits, targets, ignore_index):
    try:
        from lmloss.ops import stats_triton
    except ImportError as e:
        raise ImportError(f"impl='triton' needs triton ({e}); pip install 'lmloss[triton]', or use impl='chunked'") from e
    return TokenStats(*stats_triton.token_stats_rows(logits, targets, ignore_index))  # ignored rows done in-kernel


STATS_IMPLS = {"reference": reference_rows, "chunked": chunked_rows, "triton": _triton_rows}
