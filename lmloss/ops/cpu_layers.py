"""A Llama-family model's elementwise layers on the CPU, one C pass each, while a cpu_forward block runs.

    LlamaRMSNorm(x)          == w * (x * rsqrt(mean(x ** 2, -1) + eps))  -> native.rms_norm(x, w, eps)
    LlamaMLP(x)              == down(silu(gate(x)) * up(x))              -> down(native.silu_mul(gate(x), up(x)))
    apply_rotary_pos_emb(q, k, cos, sin)  (transformers' modeling_llama)  -> native.rope(q, ...), native.rope(k, ...)

and the same for every other architecture whose code for them is Llama's, text for text: an *RMSNorm or *MLP
class whose own forward has the same source as Llama's (Qwen2, Qwen3, Mistral, Granite, SmolLM3 in transformers
5.24; an MLP only with a SiLU activation, so Gemma-3's GELU MLP stays), and a modeling module whose
apply_rotary_pos_emb and rotate_half have the same source as Llama's (those and Gemma-3's, StarCoder2's).

transformers computes each of these as four to eight torch ops, a pass over memory and an OpenMP fork/join
each; on SmolLM2-135M (2 x 1024 positions, 2 Zen 5 cores) they took ~75 ms of a 1.6 s forward, RoPE alone
~40 (rotate_half's slices, negation and cat on the transposed projections). The C loops (native_cpu.c) do each
in one pass on torch's OpenMP threads: RMSNorm 0.20 -> 0.09 ms, SiLU x up 0.58 -> 0.39, RoPE of q and k 0.69
-> 0.17 per layer. RoPE's output is the contiguous (B, H, T, D) tensor the attention then reads without a copy.

Numbers: RoPE is bit for bit transformers' (the same products and sum, no fused multiply-add); RMSNorm differs
only in the rounding of the row's sum of squares (float32 lanes, double across; ~3e-7 relative), SiLU in its
exponential (the C polynomial, ~3e-7).

`routes(module)` installs them for a `with` block: on each such RMSNorm and MLP (whose class defines that forward
itself, so a subclass that only inherits it is left alone, and only where nobody else replaced the forward) an
instance `forward`, and the module-level apply_rotary_pos_emb of each such modeling module that the model's
classes come from; all removed when the last block that installed them ends. Each
replacement does its C pass only where it applies (CPU, float32, no autograd, the native library with its
OpenMP drivers) and calls transformers' own code for everything else, so another thread using the same model
or modeling_llama meanwhile gets the same function. Any other architecture is left as it is.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from contextlib import contextmanager

import torch

from lmloss.ops import native

_lock = threading.Lock()
_installed: dict[int, list] = {}  # id(model) -> [count of open blocks, [(submodule, replacement)]]
_ropes: dict[str, list] = {}  # modeling module name -> [count of open blocks, its own apply_rotary_pos_emb, ours]


def _llama():
    try:
        from transformers.models.llama import modeling_llama
    except ImportError:
        return None
    return modeling_llama


@functools.lru_cache(maxsize=None)
def _source(obj) -> str | None:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def _same_code(obj, llama_obj) -> bool:
    """obj's source is Llama's, text for text (None where either cannot be read: then not the same)."""
    mine, theirs = _source(obj), _source(llama_obj)
    return mine is not None and mine == theirs


def _fast(*tensors: torch.Tensor) -> bool:
    """The C passes apply: float32 CPU tensors, no autograd wanted, the library on torch's OpenMP threads."""
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32
               and t.layout == torch.strided for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return native.on_torch_threads()


def _rms_norm_forward(self, hidden_states):
    w = self.weight
    if (_fast(hidden_states, w) and hidden_states.is_contiguous() and w.is_contiguous() and w.dim() == 1
            and hidden_states.dim() >= 1 and hidden_states.shape[-1] == w.shape[0] > 0):
        return native.rms_norm(hidden_states, w, float(self.variance_epsilon))
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    if _fast(g, u) and g.shape == u.shape and g.is_contiguous() and u.is_contiguous():
        return self.down_proj(native.silu_mul(g, u))
    return self.down_proj(self.act_fn(g) * u)


def _rope_for(original):
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) in C where it applies, else `original`'s."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        ok = (unsqueeze_dim == 1 and _fast(q, k, cos, sin) and q.dim() == k.dim() == 4 and cos.dim() == 3
              and cos.shape == sin.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
              and cos.shape[1:] == q.shape[2:] and cos.shape[0] in (1, q.shape[0]) and q.shape[3] % 2 == 0
              and q.stride(3) == 1 and k.stride(3) == 1)
        if not ok:
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.contiguous(), sin.contiguous()
        return native.rope(q, cos, sin), native.rope(k, cos, sin)

    apply_rotary_pos_emb.lmloss_original = original
    return apply_rotary_pos_emb


def _silu_types() -> tuple:
    try:
        from transformers.activations import SiLUActivation
        return SiLUActivation, torch.nn.SiLU
    except ImportError:  # a transformers without it: torch's own module only
        return (torch.nn.SiLU,)


def _patchable(module, llama) -> list:
    """The submodules whose forward gets a C pass: RMSNorm and MLP classes with Llama's own forward (the MLP's
    activation SiLU, its projections nn.Linear)."""
    silu = _silu_types()
    found = []
    for m in module.modules():
        cls = type(m)
        if "forward" in m.__dict__ or "forward" not in vars(cls):
            continue  # someone else's replacement, or a forward inherited from another class: leave it
        if cls.__name__.endswith("RMSNorm") and _same_code(cls.forward, llama.LlamaRMSNorm.forward):
            found.append((m, _rms_norm_forward))
        elif (cls.__name__.endswith("MLP") and _same_code(cls.forward, llama.LlamaMLP.forward)
              and type(getattr(m, "act_fn", None)) in silu
              and all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))):
            found.append((m, _mlp_forward))
    return found


def _rope_modules(module, llama) -> list[str]:
    """The modeling modules of the model's classes whose apply_rotary_pos_emb and rotate_half are Llama's."""
    names = []
    for name in sorted({type(m).__module__ for m in module.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        fn = getattr(fn, "lmloss_original", fn)  # already ours (another block): judge the original
        if (fn is not None and _same_code(fn, llama.apply_rotary_pos_emb)
                and _same_code(getattr(mod, "rotate_half", None), llama.rotate_half)):
            names.append(name)
    return names


@contextmanager
def routes(module: torch.nn.Module | None):
    """The C passes for `module`'s Llama-coded layers while the block runs (nothing for other models, or None)."""
    llama = _llama()
    if module is None or llama is None or not native.on_torch_threads():
        yield
        return
    key = id(module)
    with _lock:
        entry = _installed.get(key)
        if entry is None:
            patched = _patchable(module, llama)
            for m, fn in patched:
                m.forward = fn.__get__(m)
            entry = _installed[key] = [0, patched, _rope_modules(module, llama)]
        entry[0] += 1
        for name in entry[2]:
            rope = _ropes.get(name)
            if rope is None:
                mod = sys.modules[name]
                original = mod.apply_rotary_pos_emb
                rope = _ropes[name] = [0, original, _rope_for(original)]
                mod.apply_rotary_pos_emb = rope[2]
            rope[0] += 1
    try:
        yield
    finally:
        with _lock:
            for name in entry[2]:
                rope = _ropes[name]
                rope[0] -= 1
                if rope[0] == 0:
                    del _ropes[name]
                    mod = sys.modules[name]
                    if mod.apply_rotary_pos_emb is rope[2]:
                        mod.apply_rotary_pos_emb = rope[1]
            entry[0] -= 1
            if entry[0] == 0:
                del _installed[key]
                for m, fn in entry[1]:
                    if getattr(m.__dict__.get("forward"), "__func__", None) is fn:
                        del m.__dict__["forward"]
