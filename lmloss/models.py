"""Load a causal language model (hub name, local folder, GGUF file, or a module) for scoring.

    model = load_model("gpt2")                                   # hub name (or a local folder)
    model = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf") # GGUF, dequantized on load
    logits = model(input_ids)                                    # (B, T, V)
    hidden = model.hidden_states(input_ids)                      # (B, T, d), after the final norm
    logits == hidden @ model.head.weight.T + model.head.bias, then softcap * tanh(./softcap)

`model.head` is None when the model has no separable output head, or when the head applied to the
hidden state does not reproduce the model's own logits (an unknown final-logit transform); the
evaluation loop then scores from the logits, and `model.notes` says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Head", "LoadedModel", "load_model", "resolve_device", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class Head:
    """The output layer: logits = softcap * tanh((hidden @ weight.T + bias) / softcap)."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> logits (..., V) in the model's dtype, with the model's final transform."""
        out = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


@dataclass
class LoadedModel:
    """A causal LM in eval mode on one device; call it for logits, or take hidden states + head."""

    module: torch.nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    context_length: int | None
    head: Head | None = None
    notes: list[str] = field(default_factory=list)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, V)."""
        return self.module(input_ids=input_ids, use_cache=False).logits

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> last hidden state (B, T, d), the input of `head`."""
        return self.module.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    @property
    def vocab_size(self) -> int:
        return int(self.module.get_output_embeddings().weight.shape[0])


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available, then mps, then cpu; anything else is passed to torch.device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err}); "
                         "expected auto, cpu, cuda, cuda:N or mps") from None


def _text_config(config):
    """The language model's own config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _context_length(config) -> int | None:
    config = _text_config(config)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_head(module: torch.nn.Module, notes: list[str]) -> Head | None:
    """The output head, if head(hidden_states(x)) reproduces the model's logits on a probe input."""
    out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    base = getattr(module, "base_model", None)
    if not isinstance(out, torch.nn.Linear) or base is None or base is module:
        notes.append("no separable output head (get_output_embeddings / base_model): scoring from logits")
        return None
    softcap = getattr(_text_config(module.config), "final_logit_softcapping", None)
    head = Head(out.weight, out.bias, float(softcap) if softcap else None)
    # Probe: any other final transform (logit scales, ...) shows up as a mismatch here.
    vocab = out.weight.shape[0]
    probe = (torch.arange(1, 9, device=out.weight.device) * 7919 % vocab).unsqueeze(0)
    with torch.inference_mode():
        want = module(input_ids=probe, use_cache=False).logits.float()
        got = head.logits(base(input_ids=probe, use_cache=False).last_hidden_state).float()
    tol = 1e-4 if out.weight.dtype == torch.float32 else 2e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
        notes.append("the output head applied to the last hidden state does not reproduce the model's "
                     "logits (an unknown final-logit transform): scoring from logits")
        return None
    return head


def _from_pretrained(spec: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' AutoModelForCausalLM for a GGUF file, a local folder or a hub name."""
    from transformers import AutoModelForCausalLM

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {spec!r}; pass the path of an existing .gguf file")
        kwargs, where, tried = {"gguf_file": path.name}, str(path.parent), f"the GGUF file {path}"
    else:
        kwargs, where = {}, str(path) if path.is_dir() else spec
        tried = f"the local folder {path}" if path.is_dir() else f"the Hugging Face Hub name {spec!r}"
    try:
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as err:
        if "sdpa" not in str(err).lower() and "attn_implementation" not in str(err):
            raise ValueError(f"could not load model {spec!r} from {tried}: {err}") from None
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(
            f"could not load model {spec!r}: tried {tried}{offline} and got: {str(err).splitlines()[0]}\n"
            "Offline, pass a local folder with config.json and weights or a .gguf file path "
            "(e.g. path/to/SmolLM2-135M-Instruct.Q4_1.gguf), and set HF_HUB_OFFLINE=1 to skip the hub."
        ) from None


def load_model(spec, *, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """A causal LM ready for scoring: eval mode, on `device`, in `dtype`, its head found if it has one.

    spec: a hub name, a local folder, a .gguf path, or an already built transformers model.
    device: "auto" (cuda, then mps, then cpu) or a torch device string.
    dtype: "float32", "bfloat16" or "float16".
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype, dev = DTYPES[dtype], resolve_device(device)
    if isinstance(spec, torch.nn.Module):
        module, name = spec, type(spec).__name__
    elif isinstance(spec, (str, os.PathLike)):
        module, name = _from_pretrained(str(spec), torch_dtype), str(spec)
    else:
        raise TypeError(f"model must be a name, a path or a torch.nn.Module, got {type(spec).__name__}")
    module = module.to(device=dev, dtype=torch_dtype).eval()
    notes: list[str] = []
    head = _find_head(module, notes)
    return LoadedModel(module, name, dev, torch_dtype, _context_length(module.config), head, notes)
