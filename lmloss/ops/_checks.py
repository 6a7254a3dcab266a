"""Input validation, the choice of implementation ("auto"), row views and reductions shared by every
implementation of the ops contract and by the fused linear cross-entropy."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits(logits) -> int:
    """Raise TypeError/ValueError unless logits is a floating (..., V) tensor with V >= 1; return V."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (..., V), got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16 (float64 for gradcheck), got {logits.dtype}; "
            "integer or complex scores are not logits, convert them with logits.float()"
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    return logits.shape[-1]


def check_targets(logits, targets, ignore_index: int) -> None:
    """Raise unless targets is int64 of shape logits.shape[:-1], on logits' device, each in [0, V) or ignore_index.

    The range check reads the targets once (one device sync on CUDA): a bad id would otherwise read
    out of bounds in a kernel or fail later with a message that does not name the token.
    """
    V = check_logits(logits)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of int64 token ids, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 (torch.long) token ids, got {targets.dtype}; use targets.long()")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocabulary dim, "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)}); for next-token loss pair "
            "logits[:, :-1] with ids[:, 1:]"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}; move them to one device")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), targets.shape)) if targets.dim() else ()
        value = int(targets.reshape(-1)[flat])
        raise ValueError(
            f"targets{list(where)} = {value} is outside the vocabulary [0, {V}) and is not "
            f"ignore_index={ignore_index} ({int(bad.sum())} bad target(s) in all); check the tokenizer "
            "matches the model, or pass the padding id as ignore_index"
        )


def triton_available() -> bool:
    """Whether `import triton` succeeds here (a cached import after the first call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_impl(impl: str, device: torch.device, names) -> str:
    """The implementation `impl` names for tensors on `device`: "auto" is "triton" on CUDA when triton
    imports, "native" on the CPU where `names` has it and its C library builds (lmloss/ops/native.py),
    else "chunked" (CPU, or CUDA without Triton); any other name must be one of `names`.
    The one rule for token_nll, cross_entropy, logsumexp and linear_token_nll / linear_cross_entropy."""
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and "native" in names:
            from lmloss.ops import native

            if native.available():
                return "native"
        return "chunked"
    if impl not in names:
        raise ValueError(f"unknown impl {impl!r}; expected 'auto' or one of {sorted(names)}")
    return impl


def row_views(x: torch.Tensor) -> list[torch.Tensor]:
    """2-D (rows, V) views that cover x's rows in order, never a copy.

    A (B, T, V) tensor that cannot be viewed as (B*T, V) -- the logits[:, :-1] slice of next-token
    shifting -- becomes B views of (T, V), each with its own row stride.
    """
    V = x.shape[-1]
    if x.dim() <= 2:
        return [x.reshape(-1, V)]  # a view for <= 2 dims
    try:
        return [x.view(-1, V)]
    except RuntimeError:
        return [v for xi in x.unbind(0) for v in row_views(xi)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_nll(nll: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """F.cross_entropy's reductions of a per-token NLL shaped like targets: "none" as is, "sum", or
    "mean" over the non-ignored targets (NaN when all are ignored, like torch)."""
    if reduction == "none":
        return nll
    total = nll.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()

