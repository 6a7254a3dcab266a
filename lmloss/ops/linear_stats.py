"""Token statistics (lmloss/ops/stats.py's TokenStats) from hidden states and the output head,
never building the (N, V) logits: one (rows, cols) tile of them at a time, as in linear.py.

Per row, over vocabulary blocks b with tile z_b = h @ W_b.T (+ bias) (softcapped):
    m = max over blocks of m_b,   m_b = max(z_b), argmax: the first block whose m_b is strictly larger
    s = sum_b exp(m_b - m) * s_b,                        s_b = sum(exp(z_b - m_b))
    a = sum_b exp(m_b - m) * (a_b + (m_b - m) * s_b),    a_b = sum(exp(z_b - m_b) * (z_b - m_b))
    nll = (m - z[t]) + log(s),  entropy = log(s) - a / s,  rank = sum_b #(z_b > z[t])
The merge is in float64 (N numbers per block); every sum adds terms of one sign.

Ties and rounding. The rank needs z[t] before the pass, and must be the same float32 number as the
target's entry in its tile: a logit that merely ties the target in float32 must not count, and the
target must not count itself. (h * W[t]).sum(-1) rounds differently from the matmul (on this
project's CPU it disagreed for 90% of rows); a (rows, cols) matmul of the same shape as the tiles,
with W[t_i] as its column i, agreed in every case tried. So z[t] is computed that way first, then
checked against the entry picked from the target's tile during the pass; the rare rows where the two
differ (another BLAS path, e.g. a narrower last block) get their rank again from their own logits,
materialized a few rows at a time. The rank thus counts logits strictly above the target's as this
function computes them in float32; rank == 0 exactly when no computed logit exceeds the target's.
"""

from __future__ import annotations

import torch

from lmloss.ops._checks import compute_dtype
from lmloss.ops._threads import parallel_rows
from lmloss.ops.linear import _CPU_TILE_ELEMS, _TILE_ELEMS, _blocks, _check, _logits_tile
from lmloss.ops.stats import _D_FLOOR, TokenStats


def linear_token_stats(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                       chunk_size=None) -> TokenStats:
    """token_stats(hidden @ weight.T + bias, targets) (logits z replaced by softcap * tanh(z / softcap)
    when softcap is given), without materializing the logits: nll and entropy in nats, float32
    (float64 for float64 inputs), rank and argmax int64, each shaped like targets; ignored targets
    get nll 0.0 and rank -1. hidden (..., d) float; weight (V, d) same dtype; bias (V,) or None;
    targets (...) int64. Logits are computed in float32 (float64 for float64 inputs) with torch
    matmuls, on any device. chunk_size: vocabulary entries per tile (default 2048).
    Not differentiable (runs under no_grad); never writes to its inputs."""
    h2, t1 = _check(hidden, weight, targets, bias, ignore_index, softcap)
    with torch.no_grad():
        stats = _stats_chunked(h2, weight, t1, bias, ignore_index, softcap, chunk_size)
    return TokenStats(*(x.reshape(targets.shape) for x in stats))


def _stats_chunked(h2, weight, t1, bias, ignore_index, softcap, chunk_size):
    N, V = h2.shape[0], weight.shape[0]
    dt = compute_dtype(h2.dtype)
    dev = h2.device
    rows, cols = _blocks(N, V, chunk_size, _CPU_TILE_ELEMS if dev.type == "cpu" else _TILE_ELEMS)
    valid = t1 != ignore_index
    tc = torch.where(valid, t1, 0)  # (N,), column 0 stands in for ignored rows
    f64 = dict(dtype=torch.float64, device=dev)
    state = dict(m=torch.full((N,), float("-inf"), **f64), s=torch.zeros(N, **f64), a=torch.zeros(N, **f64),
                 argmax=torch.zeros(N, dtype=torch.int64, device=dev),
                 n_above=torch.zeros(N, dtype=torch.int64, device=dev),
                 x_t=torch.empty(N, dtype=dt, device=dev),  # the target logit, computed before the pass
                 picked=torch.zeros(N, dtype=dt, device=dev))  # the target's entry in its tile

    def row_range(start, end):
        n_max = min(rows, end - start)
        buf, p_buf = torch.empty(n_max * cols, dtype=dt, device=dev), torch.empty(n_max * cols, dtype=dt, device=dev)
        hs = [h2[r0:min(r0 + rows, end)].to(dt) for r0 in range(start, end, rows)]  # one upcast each
        for k, h in enumerate(hs):  # 1. target logits first, by tile-shaped matmuls
            r = slice(start + k * rows, start + k * rows + h.shape[0])
            state["x_t"][r] = _target_logits(h, weight, bias, tc[r], softcap, cols, buf)
        for c0 in range(0, V, cols):  # 2. one pass over the vocabulary
            w_block = weight[c0:c0 + cols].to(dt)
            b_block = None if bias is None else bias[c0:c0 + cols].to(dt)
            for k, h in enumerate(hs):
                r = slice(start + k * rows, start + k * rows + h.shape[0])
                z = _logits_tile(buf, h, w_block, b_block, softcap)  # (n, w)
                _fold_block(z, p_buf, tc[r] - c0, c0, {key: v[r] for key, v in state.items()})

    parallel_rows(row_range, N, rows, dev)
    # 3. rows whose precomputed target logit is not their tile's entry: rank from their own logits
    redo = (state["x_t"] != state["picked"]).nonzero()[:, 0]
    if redo.numel():
        state["n_above"][redo] = _rank_from_logits(h2[redo], weight, bias, tc[redo], softcap, cols)
    log_s = state["s"].log()
    nll = (state["m"] - state["picked"].double()) + log_s
    entropy = log_s - state["a"] / state["s"]
    return (torch.where(valid, nll, 0.0).to(dt), entropy.to(dt), torch.where(valid, state["n_above"], -1),
            state["argmax"])


def _target_logits(h, weight, bias, t, softcap, cols, buf):
    """z[i, t[i]] for the rows h (n, d), each from a (n, cols) matmul whose column i - g holds W[t[i]]
    for the group of cols rows starting at g: the same shape, and so the same rounding, as a tile."""
    n, dt = h.shape[0], h.dtype
    w_pad = torch.zeros(min(cols, weight.shape[0]), weight.shape[1], dtype=dt, device=h.device)
    b_pad = None if bias is None else torch.zeros(w_pad.shape[0], dtype=dt, device=h.device)
    out = torch.empty(n, dtype=dt, device=h.device)
    for g in range(0, n, w_pad.shape[0]):
        idx = t[g:g + w_pad.shape[0]]
        k = idx.numel()
        w_pad[:k] = weight[idx]
        if b_pad is not None:
            b_pad[:k] = bias[idx]
        z = _logits_tile(buf, h, w_pad, b_pad, softcap)  # (n, cols)
        out[g:g + k] = z[g:g + k, :k].diagonal()
    return out


def _fold_block(z, p_buf, t_local, c0, st):
    """Fold the tile z (n, w) of columns [c0, c0 + w) into the rows' running state st (views of the
    (N,) state tensors, updated in place). z is overwritten."""
    n, w = z.shape
    # 1. rank against the target logit computed before the pass; and the target's own entry
    st["n_above"] += (z > st["x_t"][:, None]).sum(dim=1)
    here = (t_local >= 0) & (t_local < w)
    st["picked"] += torch.where(here, z.gather(1, t_local.clamp(0, w - 1)[:, None])[:, 0], 0.0)
    # 2. block max and its first index; an earlier block keeps the argmax on a tie
    m_b, i_b = torch.max(z, dim=1)
    m_b64 = m_b.double()
    st["argmax"].copy_(torch.where(m_b64 > st["m"], i_b + c0, st["argmax"]))
    # 3. s_b and a_b relative to the block max (a -inf block max shifts by 0: its sums are 0)
    d = z.sub_(torch.where(m_b == float("-inf"), 0.0, m_b)[:, None]).clamp_min_(_D_FLOOR)
    p = torch.exp(d, out=p_buf[: n * w].view(n, w))
    s_b, a_b = p.sum(dim=1).double(), torch.linalg.vecdot(p, d).double()
    # 4. merge in float64 around the new max M: a part (m_x, s_x, a_x) becomes
    #    (exp(m_x - M) * s_x, exp(m_x - M) * (a_x + (m_x - M) * s_x)); a -inf part adds 0
    M = torch.maximum(st["m"], m_b64)
    M_safe = torch.where(M == float("-inf"), 0.0, M)
    s_new, a_new = 0.0, 0.0
    for m_x, s_x, a_x in ((st["m"], st["s"], st["a"]), (torch.where(m_b == float("-inf"), 0.0, m_b64), s_b, a_b)):
        scale = torch.exp(m_x - M_safe)
        delta = torch.where(m_x == float("-inf"), 0.0, m_x - M_safe)
        s_new, a_new = s_new + scale * s_x, a_new + scale * (a_x + delta * s_x)
    st["s"].copy_(s_new)
    st["a"].copy_(a_new)
    st["m"].copy_(M)


def _rank_from_logits(h_rows, weight, bias, t, softcap, cols):
    """#(z > z[t]) per row, z = the rows' logits built tile by tile (a few rows at a time), z[t] taken
    from the same numbers."""
    n, V = h_rows.shape[0], weight.shape[0]
    dt = compute_dtype(h_rows.dtype)
    step = max(1, _TILE_ELEMS // V)
    rank = torch.empty(n, dtype=torch.int64, device=h_rows.device)
    buf = torch.empty(min(step, n) * cols, dtype=dt, device=h_rows.device)
    for r0 in range(0, n, step):
        h = h_rows[r0:r0 + step].to(dt)
        z = torch.empty(h.shape[0], V, dtype=dt, device=h.device)
        for c0 in range(0, V, cols):
            b_block = None if bias is None else bias[c0:c0 + cols].to(dt)
            z[:, c0:c0 + cols] = _logits_tile(buf, h, weight[c0:c0 + cols].to(dt), b_block, softcap)
        z_t = z.gather(1, t[r0:r0 + step, None])
        rank[r0:r0 + step] = (z > z_t).sum(dim=1)
    return rank
