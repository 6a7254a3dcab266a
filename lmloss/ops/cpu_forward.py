"""A transformers model's float32 CPU forward on the faster kernels, the model's weights and code unchanged.

    with cpu_forward():
        hidden = module.base_model(input_ids=ids).last_hidden_state

Inside, for as long as the block runs in this thread (a torch function mode, not a change to any module):
    F.linear(x, w, b)                                   -> onednn.linear: oneDNN's float32 GEMM, 2.2x MKL's
                                                           on AMD CPUs (lmloss/ops/onednn.py)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)  (or a sliding window's boolean mask)
                                                        -> cpu_attention.causal: one C call per layer with
                                                           AVX-512, else oneDNN products and one C loop per
                                                           row for the softmax (cpu_attention.py)
each only where it applies (CPU, float32, no autograd, ...), every other call as it was. Given the model,
`cpu_forward(module=model)` also runs a Llama-family model's RMSNorm, SiLU x up and RoPE as one C pass each
(lmloss/ops/cpu_layers.py; those replace the layers' forward for the duration of the block), which LoadedModel
does. SmolLM2-135M, 2 x 1024 positions on 2 Zen 5 cores: 2.73 s -> 1.52 s with the linear layers, -> 1.41 s
with the attention as well, -> 1.27-1.30 s with the attention's C passes on torch's OpenMP threads and the
layers in C, -> 1.18-1.22 s with the attention as one C call per layer. `LMLOSS_ONEDNN=0` turns all of it off
(it needs oneDNN), `LMLOSS_NATIVE=0` the attention and the layers (they need the C library).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from lmloss.ops import cpu_attention, cpu_layers, onednn

_F_LINEAR = torch.nn.functional.linear
_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)


def _sdpa_arguments(args, kwargs) -> dict | None:
    """F.scaled_dot_product_attention's arguments by name, or None for a call this module does not read."""
    if len(args) > len(_SDPA_NAMES) or not set(kwargs) <= set(_SDPA_NAMES[len(args):]):
        return None  # SDPA's own error, or a signature this module does not know
    bound = dict(_SDPA_DEFAULTS, **dict(zip(_SDPA_NAMES, args)), **kwargs)
    return bound if all(name in bound for name in ("query", "key", "value")) else None


class _Routes(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _F_LINEAR and set(kwargs) <= {"bias"} and len(args) + len(kwargs) in (2, 3):
            return onednn.linear(*args, **kwargs)
        if func is _SDPA:
            a = _sdpa_arguments(args, kwargs)
            ok, window = (False, None) if a is None else cpu_attention.plan(
                a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"],
                a["enable_gqa"])
            if ok:
                return cpu_attention.causal(a["query"], a["key"], a["value"], a["scale"], window=window)
        return func(*args, **kwargs)


class cpu_forward:
    """Context manager: the routes above for the code it wraps; a no-op where oneDNN is not available. Given
    the model's module, also its Llama layers' elementwise ops in C (lmloss/ops/cpu_layers.py)."""

    def __init__(self, enabled: bool = True, module: torch.nn.Module | None = None):
        self._mode = _Routes() if enabled and onednn.enabled() else None
        self._module = module if self._mode is not None else None
        self._layers = None

    def __enter__(self):
        if self._mode is not None:
            self._mode.__enter__()
        if self._module is not None:
            self._layers = cpu_layers.routes(self._module)
            self._layers.__enter__()
        return self

    def __exit__(self, *exc):
        if self._layers is not None:
            self._layers.__exit__(*exc)
            self._layers = None
        if self._mode is not None:
            return self._mode.__exit__(*exc)
        return False
