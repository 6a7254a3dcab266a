"""Triton forward of the fused linear cross-entropy (see lmloss/ops/linear.py for the contract).

Each program owns BLOCK_M rows and one slice of the vocabulary. For every BLOCK_N columns of its
slice it builds the (BLOCK_M, BLOCK_N) tile of logits with tl.dot over d in BLOCK_K steps; the
tile lives in registers only, is folded into an online log-sum-exp, and is dropped:
    lse_slice = m + log(sum(exp(z - m)))                    # per row, over the program's slice
    lse = logsumexp over slices                             # (N, SPLITS) -> (N,), in torch
    z[target] = sum over slices of the tile entry at target (exactly one slice holds it)
Splitting the vocabulary gives the GPU enough programs when N is small; the partial results are
only (N, SPLITS) floats. Offsets are int64 so N * d and V * d beyond 2**31 work.
Tested on the CPU with TRITON_INTERPRET=1 (set before triton is imported).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _linear_lse_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, tgt_ptr,
                       N, V, D, stride_h, stride_w, cols_per_split, n_splits, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_M,), tl.float32)  # running sum(exp(z - m))
    picked = tl.zeros((BLOCK_M,), tl.float32)  # z[target] when this slice holds it
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    ks = tl.arange(0, BLOCK_K)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        # 1. z = h @ W.T for this tile, fp32 accumulation, never written to memory
        z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[:, None] * stride_w + (k0 + ks)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # interpreter only: its bf16 tl.dot multiplies bit patterns
                h, w = h.to(tl.float32), w.to(tl.float32)  # triton-lang/triton#11584
            z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:  # softcap * tanh(z / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # 2. the target logit, if this tile holds it
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        # 3. online lse: s <- s * exp(m - m_new) + sum(exp(z - m_new))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = rows64 * n_splits + split
    tl.store(lse_ptr + out, m + tl.log(s), mask=row_ok)
    tl.store(tgt_ptr + out, picked, mask=row_ok)


def _fp32_precision(device) -> str:
    """tl.dot precision for float32 inputs: "tf32x3" (three tf32 products on the tensor cores,
    float32-level error: 1.8e-7 relative against float64 where "ieee" gave 5.2e-7) from Ampere on,
    else "ieee" (fp32 FMAs, 3.8x slower on an H200)."""
    return "tf32x3" if torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"


def default_precision(h2) -> str:
    """fp32 inputs: float32-level products like torch's default matmul (plain tf32 would lose 13
    bits); bf16/fp16 inputs: the tensor cores' native path ("tf32" is triton's default); the
    interpreter: "ieee"."""
    if not h2.is_cuda:
        return "ieee"
    return _fp32_precision(h2.device) if h2.dtype == torch.float32 else "tf32"


def default_config(h2, precision: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this input and tl.dot precision. Chosen
    with scripts/tune_triton.py on an H200 (N=8192, d=768, V=50257; it passes others as `config`): bf16
    256x128x64 ran 1.09x the 64x128x64 tiles; float32 (tf32x3) 128x128x64 ran 5.8x the fp32-FMA
    64x128x32 tiles; where fp32 FMAs are the only way, 128x128x32 ran 1.5x 64x128x32."""
    if not h2.is_cuda:  # the interpreter: small tiles keep the CPU emulation quick
        return 16, 32, 16, 1, 1
    if h2.element_size() == 2:
        return 256, 128, 64, 8, 3
    if precision == "tf32x3":
        return 128, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def linear_lse_target(h2, weight, t1, bias=None, *, softcap=None, config=None, precision=None):
    """-> (lse, target_logit), (N,) float32 each, for logits z = h2 @ weight.T + bias (softcapped).
    h2 (N, d) and weight (V, d) float32/bfloat16/float16 on CUDA (or CPU under TRITON_INTERPRET=1);
    t1 (N,) int64; ignored targets (outside [0, V)) give target_logit 0. precision: tl.dot's
    input_precision ("ieee", "tf32", "tf32x3"), default default_precision(h2); config: (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages), the blocks powers of 2 of at least 16, default
    default_config(h2, precision)."""
    if h2.dtype == torch.float64:
        raise TypeError("the Triton path has no float64 tl.dot; use impl='chunked' for float64")
    N, D = h2.shape
    V = weight.shape[0]
    h2, weight = h2.contiguous(), weight.contiguous()
    precision = default_precision(h2) if precision is None else precision
    block_m, block_n, block_k, warps, stages = default_config(h2, precision) if config is None else config
    if h2.is_cuda:
        n_programs_wanted = 4 * torch.cuda.get_device_properties(h2.device).multi_processor_count
    else:
        n_programs_wanted = 4
    row_blocks = triton.cdiv(N, block_m)
    n_col_blocks = triton.cdiv(V, block_n)
    n_splits = max(1, min(n_col_blocks, triton.cdiv(n_programs_wanted, row_blocks)))
    cols_per_split = triton.cdiv(n_col_blocks, n_splits) * block_n
    n_splits = triton.cdiv(V, cols_per_split)
    lse_parts = torch.empty(N, n_splits, dtype=torch.float32, device=h2.device)
    tgt_parts = torch.empty(N, n_splits, dtype=torch.float32, device=h2.device)
    _linear_lse_kernel[(row_blocks, n_splits)](
        h2, weight, bias if bias is not None else h2, t1, lse_parts, tgt_parts,
        N, V, D, h2.stride(0), weight.stride(0), cols_per_split, n_splits,
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION=precision, UPCAST=not h2.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return torch.logsumexp(lse_parts, dim=1), tgt_parts.sum(dim=1)
