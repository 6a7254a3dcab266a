"""Causal self-attention on the CPU in float32: one C call per layer where the CPU has AVX-512, else oneDNN's
products and one C loop per row for the softmax.

    out = softmax(scale * q @ k.T + causal_mask) @ v        # == F.scaled_dot_product_attention(q, k, v,
                                                            #        is_causal=True, scale=scale, enable_gqa=True)

torch's CPU flash attention takes its two products from MKL's sgemm, which on AMD CPUs runs its AVX2 code (half
of oneDNN's AVX-512 rate, lmloss/ops/onednn.py), and spends most of its time outside them: SmolLM2-135M's
attention (9 heads of 64, 3 key/value heads, 1024 positions, batch 2) took 19.8 ms per layer on 2 Zen 5 cores,
at 122 GFLOP/s against 494 for a float32 GEMM.

Fused (native.attention, where native.attention_ready(): the library built with AVX-512, on torch's OpenMP
threads): per (batch, head, tile of 24 query rows), on a thread of torch's OpenMP team, the scores of the keys the
tile sees in register tiles (12 rows x 32 keys), its softmax rows, and p @ v in register tiles (6 rows x 64),
all in the core's cache, divided into the output's layout. The keys are first copied into panels of 32 keys,
transposed. No scores beyond the diagonal are computed but a tile's own triangle. It also takes a sliding
window (row i sees the keys i - w < j <= i): `window_of` reads SDPA's boolean mask as one where it is exactly
that band (transformers' sliding-window layers, Gemma-3's: 14 instead of SDPA's 45 ms per layer of 4 heads of
256 at 2 x 1024, window 512). SmolLM2's layer: 6.1-6.6 ms (369-409 GFLOP/s over the causal half), the whole
2 x 1024 forward 1.29 -> 1.20 s.

Blocks (elsewhere), per (batch, head, block of 256 query rows):
    s = q_block @ k[:end].T                 oneDNN, float32 (end = the block's last row + 1: causal, no waste
                                            beyond the diagonal block)
    p = exp(scale * (s - rowmax)), 0 above the diagonal, and the row sums    native_cpu.c, in place on s
    out_block = (p @ v[:end]) / row sums    oneDNN, then native_cpu.c's division into the output's layout
with the heads that share a key/value head stacked into one block, driven from the calling thread, each product
and C pass on all of torch's OpenMP threads: 9.5-10 ms per layer in the model. (Worker threads taking blocks
in turn, with single-threaded products, were 10% faster alone but 20% slower inside the model: OpenMP's
threads, still spinning after the projection before, take the cores from them.)

`applies` says when this runs (CPU, float32, 4-D, square causal, no mask but a sliding window's where the
fused call is here, no dropout, no autograd, the native library and oneDNN both available, at least
MIN_POSITIONS positions, FUSED_MIN_POSITIONS for the fused call); everything else is SDPA's own. Rows whose
scores are not finite (a NaN or infinite score) are recomputed by SDPA, so NaN propagates exactly as SDPA
propagates it. Both softmaxes compute the same formula in C (exact
row max, the same 2^y polynomial, float32 lanes summed in double); the numbers are SDPA's up to float32
summation order (~1e-6 relative).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch

from lmloss.ops import native, onednn

BLOCK_ROWS = 256  # query rows per block: products large enough for oneDNN, little waste on the diagonal
MIN_POSITIONS = 512  # below, per-block overhead outweighs what the products gain (2 x 256: 2.4 vs 2.0 ms): SDPA
FUSED_MIN_POSITIONS = 64  # the fused call against SDPA, SmolLM2's layer: 0.08 vs 0.13 ms at 64, 0.04 both at 32
_LOG2E = 1.4426950408889634
_SDPA = torch.nn.functional.scaled_dot_product_attention


def applies(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    """Whether causal(q, k, v, scale, window=window_of(attn_mask, q)) replaces F.scaled_dot_product_attention
    for these arguments: causal, or (the fused call only) a boolean mask that is a causal sliding window."""
    return plan(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def plan(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False) -> tuple[bool, int | None]:
    """(applies(...), the window to pass to causal()): the mask read once, after every cheaper check."""
    if dropout_p != 0.0 or not (is_causal and attn_mask is None or not is_causal and attn_mask is not None):
        return False, None
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32
               and t.dim() == 4 and t.layout == torch.strided for t in (q, k, v)):
        return False, None
    (B, H, T, D), (Bk, Hk, Tk, Dk), (Bv, Hv, Tv, Dv) = q.shape, k.shape, v.shape
    least = FUSED_MIN_POSITIONS if native.attention_ready() else MIN_POSITIONS
    if not (B == Bk == Bv and T == Tk == Tv and D == Dk and Hk == Hv and Hk > 0 and T >= least and D > 0):
        return False, None
    if H != Hk and not (enable_gqa and H % Hk == 0):
        return False, None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False, None
    if not (onednn.enabled() and native.available()):
        return False, None
    if attn_mask is None:
        return True, None
    window = window_of(attn_mask, q) if native.attention_ready() else None
    return window is not None, window


_last_window = (None, -1, None, None)  # (weakref to the last mask read, its version, its (B, T), its window)


@functools.lru_cache(maxsize=2)
def _band(T: int, window: int) -> torch.Tensor:
    """(T, T) bool: row i sees the keys i - window < j <= i (kept for the next layers: never written to)."""
    i = torch.arange(T)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def window_of(attn_mask, q) -> int | None:
    """The window w where attn_mask is SDPA's boolean mask of a causal sliding window for q (B, H, T, D): True
    exactly at the keys i - w < j <= i of every query row i, the same for every batch row and head (what
    transformers gives a sliding-window layer, Gemma-3's); else None (also for attn_mask None). A mask passed to
    several layers is read once (kept by a weak reference and its version counter); an inference tensor, which
    has no version counter, is read every time (a comparison with a kept band, ~0.1 ms at 1024 positions)."""
    global _last_window
    if not (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool and attn_mask.device.type == "cpu"
            and attn_mask.layout == torch.strided and attn_mask.dim() in (2, 3, 4) and q.dim() == 4):
        return None
    B, T = q.shape[0], q.shape[2]
    try:
        now = attn_mask._version
    except RuntimeError:  # an inference tensor: it may have been written to in place without a trace
        now = None
    ref, version, shape, window = _last_window
    if now is not None and ref is not None and ref() is attn_mask and version == now and shape == (B, T):
        return window
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() < 4 else attn_mask
    window = None
    if m.shape[-2:] == (T, T) and m.shape[0] in (1, B) and m.shape[1] in (1, q.shape[1]) and T > 0:
        w = int(m[0, 0, T - 1].sum())  # the keys the last row sees
        if w > 0:
            band = _band(T, w)
            slices = {(b, h) if m.stride(0) or b == 0 else (0, h) for b in range(m.shape[0]) for h in range(m.shape[1])}
            if all(torch.equal(m[b, h], band) for b, h in sorted(slices)):
                window = w
    if now is not None:
        _last_window = (weakref.ref(attn_mask), now, (B, T), window)
    return window


def causal(q, k, v, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """softmax(scale * q @ k.T, causal) @ v for q (B, H, T, D), k and v (B, Hk, T, Dv), H a multiple of Hk
    (grouped heads: query head h reads key/value head h // (H / Hk)); scale defaults to 1 / sqrt(D); with a
    window (the fused call only), row i sees the keys i - window < j <= i.
    Returns (B, H, T, Dv) float32, a view of a (B, T, H, Dv) tensor (the layout the next projection reads)."""
    B, H, T, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    group = H // Hk
    c = (1.0 / math.sqrt(D) if scale is None else float(scale)) * _LOG2E
    out = torch.empty(B, T, H, Dv, dtype=torch.float32)
    if native.attention_ready():
        return _fused(q, k, v, scale, c, out, window if window is not None and window < T else None)
    if window is not None and window < T:
        raise ValueError("a sliding window needs the fused attention (native.attention_ready()), which is not here")
    out_groups = out.view(B, T, Hk, group, Dv)
    keys = k.contiguous()                         # (B, Hk, T, D): k[:end] is one block of rows
    values_t = v.transpose(-1, -2).contiguous()   # (B, Hk, Dv, T)
    sums_buffer = torch.empty(group * BLOCK_ROWS, dtype=torch.float32)
    redo = []
    for b in range(B):
        for hk in range(Hk):
            for i0 in range(0, T, BLOCK_ROWS):
                i1 = min(T, i0 + BLOCK_ROWS)
                rows = i1 - i0
                # the query heads that share key/value head hk, stacked: one product of group * rows rows
                qs = q[b, hk * group:(hk + 1) * group, i0:i1].reshape(group * rows, D)
                s = onednn.product(qs, keys[b, hk, :i1])  # (group * rows, i1)
                sums = sums_buffer[:group * rows]
                if native.causal_probs(s, i0 + 1, c, sums, period=rows):
                    redo.extend((b, hk * group + g, i0, i1) for g in range(group))
                # oneDNN's weight operand must be contiguous: a strided one takes its reference path, 1000x slower
                o = onednn.product(s, values_t[b, hk, :, :i1].contiguous())
                native.divide_rows(o.view(group, rows, Dv), sums.view(group, rows), out_groups[b, i0:i1, hk])
    for b, h, i0, i1 in redo:  # NaN or infinite scores: SDPA's own numbers for those rows
        hk = h // group
        mask = torch.ones(i1 - i0, i1, dtype=torch.bool).tril(diagonal=i0)
        out[b, i0:i1, h] = _SDPA(q[b, h, i0:i1], k[b, hk, :i1], v[b, hk, :i1], attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _fused(q, k, v, scale, c, out, window):
    """The whole layer in one C call (native.attention); rows with a NaN or infinite score recomputed by SDPA."""
    B, H, T, D = q.shape
    Hk = k.shape[1]
    q = q if q.stride(3) == 1 else q.contiguous()
    v = v if v.stride(3) == 1 else v.contiguous()
    Tp = -(-T // 32) * 32  # panels of 32 keys, transposed: (B, Hk, Tp / 32, D, 32), each contiguous
    keys_t = torch.nn.functional.pad(k, (0, 0, 0, Tp - T)).view(B, Hk, Tp // 32, 32, D).transpose(-1, -2).contiguous()
    bad = torch.zeros(B, H, T, dtype=torch.uint8)
    if native.attention(q, keys_t, v, c, out, bad, window=window):
        group = H // Hk
        for b, h in bad.any(-1).nonzero().tolist():
            rows = bad[b, h].nonzero().flatten()
            last = int(rows[-1]) + 1
            mask = _band(last, window or last)[rows]
            out[b, rows, h] = _SDPA(q[b, h, rows], k[b, h // group, :last], v[b, h // group, :last],
                                    attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
