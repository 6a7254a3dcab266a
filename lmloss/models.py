"""Load a causal language model (hub name, local folder, GGUF file, or a module) for scoring.

    model = load_model("gpt2")                                   # hub name (or a local folder)
    model = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf") # GGUF, dequantized on load, once:
                                                                 # then read from lmloss.gguf_cache
    logits = model(input_ids)                                    # (B, T, V)
    hidden = model.hidden_states(input_ids)                      # (B, T, d), after the final norm
    logits == hidden @ model.head.weight.T + model.head.bias, then softcap * tanh(./softcap)

    info = peek_config("models/SmolLM2-135M-Instruct.Q4_1.gguf")  # context_length, vocab_size; no weights
    meta = check_gguf("models/SmolLM2-135M-Instruct.Q4_1.gguf")   # its metadata; ValueError if truncated

`model.head` is None when the model has no separable output head, or when the head applied to the
hidden state does not reproduce the model's own logits (an unknown final-logit transform); the
evaluation loop then scores from the logits, and `model.notes` says why.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmloss.ops import onednn
from lmloss.ops.cpu_forward import cpu_forward

__all__ = ["Head", "LoadedModel", "ModelInfo", "check_gguf", "load_model", "peek_config", "resolve_device",
           "DTYPES"]

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
        out = onednn.linear(hidden, self.weight, self.bias)  # F.linear; on CPU float32 through oneDNN
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
        with cpu_forward(module=self.module):
            return self.module(input_ids=input_ids, use_cache=False).logits

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> last hidden state (B, T, d), the input of `head`."""
        with cpu_forward(module=self.module):
            return self.module.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    @property
    def vocab_size(self) -> int:
        return int(self.module.get_output_embeddings().weight.shape[0])


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available, then mps, then cpu; anything else is passed to torch.device, and
    cuda, cuda:N and mps must exist on this machine and torch build (else ValueError)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err}); "
                         "expected auto, cpu, cuda, cuda:N or mps") from None
    fix = "pass --device cpu or --device auto (device='cpu' or 'auto' in load_model)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
            raise ValueError(f"device {device!r} is not available on this machine: torch.cuda.is_available() "
                             f"is False (torch {torch.__version__}, {build}); {fix}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            names = ", ".join(f"cuda:{i}" for i in range(count))
            raise ValueError(f"device {device!r} is not available on this machine: this machine has "
                             f"{count} CUDA device{'s' if count != 1 else ''} ({names}); pass one of those, "
                             "--device cpu or --device auto")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} is not available on this machine: "
                             f"torch.backends.mps.is_available() is False (torch {torch.__version__}); {fix}")
    return dev


def _text_config(config):
    """The language model's own config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _context_length(config) -> int | None:
    """The first positive int among _CONTEXT_KEYS of the (text) config; None without one."""
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


# -- GGUF files -------------------------------------------------------------------------------------
# The layout (github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian unless the version
# reads byte-swapped: b"GGUF", u32 version, u64 tensor count, u64 key-value count, the key-value pairs
# (u64-length string key, u32 value type, value), the tensor table (name, u32 n_dims, u64 dims,
# u32 ggml type, u64 offset), then the tensor data from the next multiple of general.alignment.
# Read here with struct instead of gguf.GGUFReader: the reader builds a numpy view per string and
# takes ~6 s on SmolLM2's 98k token and merge strings; this takes a fraction of a second.

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)


class _GGUFError(Exception):
    """Why a GGUF file is unreadable: args (what failed,) or (what failed, expected file size)."""


class _GGUFHeader:
    """A cursor over a GGUF file's bytes (bytes or an mmap) that reads the header's values."""

    def __init__(self, buf, pos: int, endian: str = "<"):
        self.buf, self.pos, self.endian = buf, pos, endian

    def unpack(self, fmt: str, what: str):
        """struct.unpack_from at the cursor: one value for "Q", a tuple for "3Q"."""
        size = struct.calcsize(self.endian + fmt)
        if self.pos + size > len(self.buf):
            raise _GGUFError(f"its header runs past the end of the file (reading {what} at byte {self.pos})")
        out = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return out if fmt[0].isdigit() else out[0]

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def value(self, vtype: int, what: str):
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise _GGUFError(f"{what} has value type {vtype}, which no GGUF version defines (expected 0..12)")
        etype, n = self.unpack("I", what), self.unpack("Q", what)
        min_size = struct.calcsize(_GGUF_SCALARS[etype]) if etype in _GGUF_SCALARS else 8
        if self.pos + n * min_size > len(self.buf):
            raise _GGUFError(f"its header runs past the end of the file ({what}: an array of {n} "
                             f"values at byte {self.pos})")
        if etype in _GGUF_SCALARS:  # the whole array in one unpack
            return list(self.unpack(f"{n}{_GGUF_SCALARS[etype]}", what))
        if etype == _GGUF_STRING:  # a vocabulary: 10^5 strings, so one tight loop
            return self.strings(n, what)
        return [self.value(etype, what) for _ in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """[self.string(what) for _ in range(n)], in one tight loop: a vocabulary holds 10^5 strings."""
        buf, pos, size, length = self.buf, self.pos, len(self.buf), struct.Struct(self.endian + "Q")
        out = []
        for i in range(n):
            start = pos + 8
            if start > size or start + length.unpack_from(buf, pos)[0] > size:
                raise _GGUFError(f"its header runs past the end of the file ({what}: string {i} of {n} "
                                 f"at byte {pos})")
            pos = start + length.unpack_from(buf, pos)[0]
            out.append(buf[start:pos].decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out


def _gguf_tensor_bytes(ggml_type: int, dims: tuple[int, ...], name: str) -> int:
    """Bytes of one tensor's data: n_elements // block_size * type_size, from gguf's quantization table."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as err:
        raise ImportError(f"reading GGUF files needs the gguf package: pip install gguf accelerate "
                          f"({err})") from None
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _GGUFError(f"tensor {name!r} has ggml type {ggml_type}, which the installed gguf package "
                         "does not know (if the file is intact, pip install -U gguf)") from None
    n_elements = 1
    for d in dims:
        n_elements *= d
    return n_elements // block_size * type_size


def _read_gguf(buf) -> tuple[dict, int]:
    """(metadata, byte offset where the tensor data starts) of a GGUF file's bytes, after checking
    that every tensor's data lies within them."""
    if len(buf) == 0:
        raise _GGUFError("the file is empty")
    if buf[:4] != b"GGUF":
        raise _GGUFError(f"it starts with {buf[:4]!r}, not b'GGUF'")
    header = _GGUFHeader(buf, 4)
    version = header.unpack("I", "the version")
    if version & 0xFFFF == 0:  # a big-endian file: its version reads byte-swapped
        header.endian, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _GGUF_VERSIONS:
        raise _GGUFError(f"GGUF version {version} is not one this reader knows (expected {_GGUF_VERSIONS})")
    n_tensors, n_kv = header.unpack("Q", "the tensor count"), header.unpack("Q", "the key count")
    if (n_tensors + n_kv) * 12 > len(buf):  # every entry takes at least 12 bytes
        raise _GGUFError(f"its header declares {n_tensors} tensors and {n_kv} keys, more than {len(buf)} "
                         "bytes hold")
    meta = {}
    for i in range(n_kv):
        key = header.string(f"key {i} of {n_kv}")
        meta[key] = header.value(header.unpack("I", f"the type of {key!r}"), repr(key))
    tensors = []  # (name, dims, ggml type, offset from the data start)
    for i in range(n_tensors):
        name = header.string(f"tensor {i} of {n_tensors}")
        what = f"tensor {name!r}"
        dims = header.unpack(f"{header.unpack('I', what)}Q", what)
        tensors.append((name, dims, header.unpack("I", what), header.unpack("Q", what)))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _GGUFError(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-header.pos // alignment) * alignment
    ends = [(data_start + offset + _gguf_tensor_bytes(ggml_type, dims, name), name, dims)
            for name, dims, ggml_type, offset in tensors]
    data_end = max((end for end, _, _ in ends), default=data_start)
    if data_end > len(buf):
        end, name, dims = min(e for e in ends if e[0] > len(buf))  # the first tensor cut off
        raise _GGUFError(f"tensor {name!r} ({'x'.join(map(str, dims))}) ends at byte {end}, past the end "
                         "of the file", data_end)
    return meta, data_start


def check_gguf(path) -> dict:
    """The metadata of a GGUF file, {key: value} with arrays as lists (e.g. meta["llama.context_length"],
    meta["tokenizer.ggml.tokens"]), after checking that its header parses and that every tensor's data
    lies within the file. Reads the header only: no tensor data, no dequantizing.

    Raises ValueError naming the file when it is missing, empty, truncated or not GGUF, with the size
    its tensor table expects where that table could be read.
    """
    return _gguf_header(path)[0]


def _gguf_header(path) -> tuple[dict, int]:
    """(check_gguf(path), byte offset where its tensor data starts), with check_gguf's errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {str(path)!r}; pass the path of an existing .gguf file")
    size = path.stat().st_size
    try:
        if size == 0:
            raise _GGUFError("the file is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _read_gguf(mm)
    except _GGUFError as err:
        what, *expected = err.args
        sizes = (f"expected size from its tensor table: {expected[0]} bytes, file has {size}" if expected
                 else f"file has {size} bytes")
        raise ValueError(f"GGUF file {path} is truncated or not a GGUF file: {what}; "
                         f"re-download it ({sizes})") from None


def _source(spec: str) -> tuple[str, dict, str]:
    """(where, from_pretrained keyword arguments, what is tried) for a .gguf path, a local folder or a
    hub name; a .gguf file is checked first (check_gguf), so transformers never meets a truncated one."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}, f"the GGUF file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {spec!r}: the local folder {path} has no config.json; pass a folder "
                             "written by save_pretrained (config.json and weights) or a .gguf file path")
        return str(path), {}, f"the local folder {path}"
    from lmloss.hub import hub_reachable, unreachable_note

    if not hub_reachable():  # the local cache only: without it transformers retries for ~50 s offline
        return spec, {"local_files_only": True}, (f"the Hugging Face Hub name {spec!r} in the local cache only "
                                                     f"({unreachable_note()})")
    return spec, {}, f"the Hugging Face Hub name {spec!r}"


def _not_found(what: str, spec: str, tried: str, err: OSError) -> ValueError:
    """The error for a model transformers could not find: what was tried, and how to work offline."""
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return ValueError(
        f"could not {what} {spec!r}: tried {tried} and got: {first}\n"
        "Offline, pass a local folder with config.json and weights or a .gguf file path "
        "(e.g. path/to/SmolLM2-135M-Instruct.Q4_1.gguf), and set HF_HUB_OFFLINE=1 to skip the hub."
    )


def _from_pretrained(spec: str, dtype: torch.dtype, **extra) -> torch.nn.Module:
    """transformers' AutoModelForCausalLM for a GGUF file, a local folder or a hub name; `extra` goes
    to from_pretrained as is."""
    from transformers import AutoModelForCausalLM

    where, kwargs, tried = _source(spec)
    kwargs.update(extra)
    try:
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as err:
        if "sdpa" not in str(err).lower() and "attn_implementation" not in str(err):
            raise ValueError(f"could not load model {spec!r} from {tried}: {err}") from None
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as err:
        raise _not_found("load model", spec, tried, err) from None


@dataclass(frozen=True)
class ModelInfo:
    """What a model's configuration says, read without its weights (None where it does not say)."""

    name: str
    context_length: int | None
    vocab_size: int | None


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def peek_config(spec) -> ModelInfo:
    """The name, context length and vocabulary size load_model(spec) would report, without loading
    (or dequantizing) any weight: a hub name or local folder through transformers.AutoConfig, a .gguf
    file through its metadata (check_gguf: f"{arch}.context_length", then f"{arch}.vocab_size" or the
    length of tokenizer.ggml.tokens, as transformers reads them), a module through its .config.
    Raises ValueError when the configuration cannot be read, as load_model would.
    """
    if isinstance(spec, torch.nn.Module):
        head = spec.get_output_embeddings() if hasattr(spec, "get_output_embeddings") else None
        config = getattr(spec, "config", None)
        vocab = getattr(head, "weight", None)
        vocab = int(vocab.shape[0]) if vocab is not None else getattr(_text_config(config), "vocab_size", None)
        return ModelInfo(type(spec).__name__, _context_length(config), _positive_int(vocab))
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a path or a torch.nn.Module, got {type(spec).__name__}")
    name = str(spec)
    if name.endswith(".gguf"):
        meta = check_gguf(name)
        arch = meta.get("general.architecture")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = meta.get(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
        return ModelInfo(name, _positive_int(meta.get(f"{arch}.context_length")), _positive_int(vocab))
    from transformers import AutoConfig

    where, kwargs, tried = _source(name)
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        raise _not_found("read the configuration of model", name, tried, err) from None
    except (ValueError, KeyError) as err:
        raise ValueError(f"could not read the configuration of model {name!r} from {tried}: {err}") from None
    vocab = getattr(_text_config(config), "vocab_size", None)
    return ModelInfo(name, _context_length(config), _positive_int(vocab))


def load_model(spec, *, device: str = "auto", dtype: str = "float32", cache: bool = True) -> LoadedModel:
    """A causal LM ready for scoring: eval mode, on `device`, in `dtype`, its head found if it has one.

    spec: a hub name, a local folder, a .gguf path (checked first by check_gguf), or an already built
    transformers model. peek_config(spec) reads the same context length and vocabulary size without
    the weights.
    device: "auto" (cuda, then mps, then cpu) or a torch device string; one this machine lacks raises
    ValueError (resolve_device).
    dtype: "float32", "bfloat16" or "float16".
    cache: for a .gguf file, convert it once and keep the float32 result (safetensors + config) under
    lmloss.cache_folder.cache_root(), so that later loads of the same file take seconds; the weights are
    bit-identical either way. False reads the file through transformers every time and leaves the
    cache folder untouched. Other specs are never cached.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype, dev = DTYPES[dtype], resolve_device(device)
    if isinstance(spec, torch.nn.Module):
        module, name = spec, type(spec).__name__
    elif isinstance(spec, (str, os.PathLike)) and cache and str(spec).endswith(".gguf"):
        from lmloss.gguf_cache import load_cached  # keys the file by its header: check_gguf's errors

        name = str(spec)
        module = load_cached(name, "model", lambda folder: _from_pretrained(str(folder), torch_dtype))
    elif isinstance(spec, (str, os.PathLike)):
        module, name = _from_pretrained(str(spec), torch_dtype), str(spec)
    else:
        raise TypeError(f"model must be a name, a path or a torch.nn.Module, got {type(spec).__name__}")
    module = module.to(device=dev, dtype=torch_dtype).eval()
    notes: list[str] = []
    head = _find_head(module, notes)
    return LoadedModel(module, name, dev, torch_dtype, _context_length(module.config), head, notes)
