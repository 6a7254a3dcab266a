"""Matrix products with float32 results from bf16/fp16 operands, as the tensor cores make them
(torch.mm's and torch.addmm's out_dtype, CUDA only), and whether this torch and device make them.

    product_f32(a, b)        a @ b accumulated and returned in float32: mm_f32 where it runs, else the
                             product of the operands upcast (the same values up to summation order)
    add_product_(acc, a, b)  acc += a @ b into a float32 accumulator, in place by the product itself
                             (cuBLAS beta = 1) where this torch can, else a product and then a sum

Modules call these through the module (`_mm.product_f32`), so tests can stand in for the CUDA-only
products on the CPU.
"""

from __future__ import annotations

import functools

import torch


def mm_f32(a, b):
    """a @ b for bf16/fp16 a and b on CUDA, accumulated and returned in float32."""
    return torch.mm(a, b, out_dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def has_mm_f32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether mm_f32 runs for these operands (CUDA, bf16/fp16, a torch with mm's out_dtype);
    asked once per device and dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        mm_f32(torch.ones(1, 1, dtype=dtype, device=device), torch.ones(1, 1, dtype=dtype, device=device))
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def addmm_f32_(acc, a, b) -> None:
    """acc += a @ b in place, acc float32, a and b bf16/fp16 on CUDA: one GEMM that reads acc as its
    C operand (torch.addmm's out_dtype with out=acc), no float32 temporary."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


@functools.lru_cache(maxsize=None)
def has_addmm_f32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm_f32_ works here, checked on values once per device and dtype: torch versions that
    have mm's out_dtype but refuse a float32 self in addmm (or would not add in place) say no."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        acc = torch.full((2, 1), 0.5, device=device)
        addmm_f32_(acc, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device),
                   torch.tensor([[3.0], [4.0]], dtype=dtype, device=device))
        return acc.flatten().tolist() == [11.5, 25.5]
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def product_f32(a, b):
    """a @ b in float32 for bf16/fp16 (or float32) a and b: mm_f32 where it runs, else upcast first."""
    return mm_f32(a, b) if has_mm_f32(a.device, a.dtype) else a.float() @ b.float()


def add_product_(acc, a, b) -> None:
    """acc += a @ b, acc float32 (or float64): a and b in acc's dtype (addmm_), or bf16/fp16 with the
    product in float32 (addmm_f32_ in place where it works, else product_f32 and a sum)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and has_addmm_f32(a.device, a.dtype):
        addmm_f32_(acc, a, b)
    else:
        acc += product_f32(a, b)
