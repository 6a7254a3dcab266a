"""The definition, in float64: nll = logsumexp(x) - x[target], grad = (softmax(x) - onehot(target)) * g.

Slow and exact: every row is computed in float64 and rounded once to the output dtype. Rows are taken
in blocks so that even the reference never holds an (N, V) float64 copy.
"""

from __future__ import annotations

import torch

from lmloss.ops._checks import compute_dtype

_BLOCK_ELEMENTS = 1 << 22  # 32 MiB of float64 per block


def _blocks(n_rows: int, V: int):
    step = max(1, _BLOCK_ELEMENTS // V)
    return ((s, min(s + step, n_rows)) for s in range(0, n_rows, step))


def nll_lse(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """logits (N, V), targets (N,) int64 -> (nll (N,) float32 (float64 for float64 logits), lse (N,) float64).

    nll = logsumexp(x) - x[target], 0.0 where target == ignore_index.
    """
    N, V = logits.shape
    out_dtype = compute_dtype(logits.dtype)
    valid = targets != ignore_index
    tcol = torch.where(valid, targets, 0)[:, None]  # (N, 1)
    nll = torch.empty(N, dtype=out_dtype, device=logits.device)
    lse = torch.empty(N, dtype=torch.float64, device=logits.device)
    for s, e in _blocks(N, V):
        x = logits[s:e].double()  # (B, V)
        lse64 = torch.logsumexp(x, dim=1)
        nll[s:e] = lse64 - x.gather(1, tcol[s:e])[:, 0]
        lse[s:e] = lse64
    return nll.masked_fill_(~valid, 0.0), lse


def grad_logits(logits, targets, lse, grad_nll, out):
    """out[i, j] = (exp(x[i, j] - lse[i]) - [j == targets[i]]) * grad_nll[i]; no one-hot where targets[i] is outside [0, V)."""
    N, V = logits.shape
    cols = torch.arange(V, device=logits.device)
    for s, e in _blocks(N, V):
        x = logits[s:e].double()
        onehot = (cols[None, :] == targets[s:e, None]).double()  # (B, V)
        p = torch.exp(x - lse[s:e, None].double())
        out[s:e] = (p - onehot) * grad_nll[s:e, None].double()
    return out
