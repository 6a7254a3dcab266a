"""Tokenizers with exact UTF-8 byte accounting: one small interface over tiktoken and Hugging Face.

For every token id, `byte_lengths()[id]` is the number of UTF-8 bytes of the text the id stands for,
so that for any text

    sum(tok.byte_lengths()[i] for i in tok.encode(text)) == len(text.encode("utf-8"))

and a training loop can count the bytes of its targets without decoding:

    lengths = lmloss.token_byte_lengths(tok).to(device)   # (V,) int64
    n_bytes = lengths[targets].sum()                        # targets (B, T)

Rules: byte-level BPE (GPT-2, cl100k, o200k, SmolLM2, Llama-3) counts the raw bytes of each token,
never its str decoding (a token may hold half a UTF-8 character). SentencePiece counts '▁' as one
space byte and a byte-fallback token '<0xNN>' as one byte. Special and control tokens (and unused
ids) count 0 bytes: `encode()` never emits them for plain text.

Where a tokenizer rewrites the text before splitting it (Unicode normalization, lowercasing, a
SentencePiece dummy-prefix space), the invariant cannot hold: the tokenizer says so in
`byte_exact = False` and `byte_note`, and `token_byte_lengths()` raises unless `strict=False`.
A SentencePiece model without byte fallback maps unseen characters to <unk> (0 bytes):
`check_byte_lengths(tok, text)` finds that out for a given text.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

__all__ = ["Tokenizer", "TiktokenTokenizer", "HFTokenizer", "load_tokenizer", "token_byte_lengths",
           "check_byte_lengths", "TIKTOKEN_NAMES"]

TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base",
                  "o200k_harmony")

_OFFLINE_HINT = (
    "Offline: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached BPE files, or pass a "
    "local Hugging Face tokenizer folder (with tokenizer.json) or a .gguf file path."
)
_TOKENIZER_FILES_HINT = (
    "Load a complete tokenizer: a folder with tokenizer.json, or vocab.json + merges.txt, or "
    "tokenizer.model; a .gguf file; or a tiktoken name such as 'gpt2' (on the command line: "
    "--tokenizer SPEC)."
)
_PROBE_TEXT = "hello world"  # plain text every usable tokenizer encodes to at least one id


class Tokenizer:
    """The interface lmloss uses: plain-text ids and the exact UTF-8 byte length of every id.

    name: short label; vocab_size: number of ids the model may see (special tokens included);
    bos_id / eos_id: None where the tokenizer has none; add_bos: whether the tokenizer's own
    convention prepends BOS to a text (Gemma yes; GPT-2, SmolLM2 no); byte_exact: whether
    sum(byte_lengths()[encode(text)]) == len(text.encode("utf-8")) holds for every text (byte_note
    says why not).
    """

    name: str = ""
    vocab_size: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    byte_exact: bool = True
    byte_note: str = ""

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no BOS/EOS added; special-token text ('<|endoftext|>') is
        split like any other text, never raises."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """[self.encode(t) for t in texts], id for id; the tokenizers that can encode texts in parallel
        threads (Hugging Face's Rust pool, tiktoken's) do so."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def byte_lengths(self) -> list[int]:
        """UTF-8 byte length of the text each id stands for, indexed by id (len == vocab_size)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding. BOS and EOS are its end-of-text token (GPT-2's convention); add_bos False."""

    def __init__(self, encoding, *, name: str | None = None):
        self._enc = encoding
        self.name = name or encoding.name
        self.vocab_size = encoding.n_vocab
        self.bos_id = self.eos_id = encoding.eot_token
        self._lengths: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=max(1, os.cpu_count() or 1))

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def byte_lengths(self) -> list[int]:
        if self._lengths is None:
            special = {self._enc.encode_single_token(s) for s in self._enc.special_tokens_set}
            lengths = []
            for i in range(self.vocab_size):
                if i in special:
                    lengths.append(0)
                    continue
                try:
                    lengths.append(len(self._enc.decode_single_token_bytes(i)))
                except KeyError:  # unused id between the ranks and the special tokens (cl100k_base)
                    lengths.append(0)
            self._lengths = lengths
        return list(self._lengths)


@functools.lru_cache(maxsize=None)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as one printable character.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other
    68 bytes, in increasing order, become chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _types(component: dict | None, key: str) -> list[dict]:
    """Flatten a tokenizer.json component that may be a Sequence of components."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [c for sub in component.get(key, []) for c in _types(sub, key)]
    return [component]


def _hf_byte_rule(spec: dict) -> tuple[str, str]:
    """('byte_level' | 'sentencepiece' | 'text', why the byte invariant fails or '')."""
    decoders = _types(spec.get("decoder"), "decoders")
    normalizers = _types(spec.get("normalizer"), "normalizers")
    pre_tokenizers = _types(spec.get("pre_tokenizer"), "pretokenizers")
    dec_types = {d["type"] for d in decoders}
    if "ByteLevel" in dec_types:
        rule = "byte_level"
    elif "Metaspace" in dec_types or any(
            d["type"] == "Replace" and d.get("pattern", {}).get("String") == "▁" for d in decoders):
        rule = "sentencepiece"
    else:
        rule = "text"
    problems = []
    if rule == "text":
        problems.append(f"its decoder ({sorted(dec_types) or 'none'}) is neither byte-level nor "
                        "SentencePiece, so token bytes are approximated by their UTF-8 text")
    for n in normalizers:
        if n["type"] == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == "▁":
            continue  # SentencePiece's space marker, undone by the '▁' = 1 byte rule
        if n["type"] == "Prepend":
            problems.append("it prepends a dummy-prefix '▁' to every text (1 byte more than the text)")
        else:
            problems.append(f"its normalizer {n['type']} rewrites the text before splitting it")
    for p in pre_tokenizers:
        if p["type"] == "ByteLevel" and p.get("add_prefix_space"):
            problems.append("its ByteLevel pre-tokenizer adds a prefix space (1 byte more than the text)")
        if p["type"] == "Metaspace" and (p.get("prepend_scheme") in ("always", "first")
                                         or p.get("add_prefix_space")):
            problems.append("its Metaspace pre-tokenizer prepends '▁' (1 byte more than the text)")
    return rule, "; ".join(problems)


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (hub name, folder or GGUF), encoded through its Rust backend
    with special-token matching turned off, so that encode() treats all input as plain text."""

    def __init__(self, hf_tokenizer, *, name: str | None = None):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"lmloss needs a fast (Rust-backed) Hugging Face tokenizer, got "
                f"{type(hf_tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        import tokenizers

        self.hf = hf_tokenizer
        self._spec = json.loads(backend.to_str())
        # A private copy: the caller's tokenizer keeps matching special tokens as before.
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.encode_special_tokens = True
        self._backend.no_truncation()  # a tokenizer.json may carry max_length: never cut a document
        self._backend.no_padding()
        self.name = name or getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(len(hf_tokenizer), max(vocab.values(), default=-1) + 1)
        self._check_can_encode()
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        # The tokenizer's own convention, observed rather than read from config flags that differ
        # between formats: does encoding with special tokens put BOS in front of the text?
        with_special = hf_tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and \
            self.encode("a")[:1] != [self.bos_id]
        self._rule, self.byte_note = _hf_byte_rule(self._spec)
        self._lengths = self._compute_byte_lengths()  # may add to byte_note
        self.byte_exact = not self.byte_note

    def _check_can_encode(self) -> None:
        """ValueError unless the vocabulary has 2+ entries and _PROBE_TEXT encodes to 1+ ids. A model
        folder without tokenizer files gives AutoTokenizer a 1-entry GPT2Tokenizer that encodes every
        text to []: evaluated, that is 0 tokens and a perfect-looking 0.0 bits per byte."""
        probe_ids = self.encode(_PROBE_TEXT)
        if self.vocab_size >= 2 and probe_ids:
            return
        encodes_to = f"to {probe_ids}" if probe_ids else "to no tokens"
        raise ValueError(
            f"tokenizer {self.name!r} cannot score text: it has vocab_size={self.vocab_size} and encodes "
            f"the plain text {_PROBE_TEXT!r} {encodes_to}, so a corpus would count no tokens (or all "
            f"the same) and its loss would mean nothing. " + _TOKENIZER_FILES_HINT)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21): the same ids without the character offsets, 10-30% less time
        # (WikiText-2's 62 test pages, GPT-2: 0.48 s against 0.54-0.71 s on 2 cores)
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def _piece_bytes(self, piece: str) -> int:
        if self._rule == "byte_level":
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return len(piece)  # one character per raw byte
            self.byte_note = self.byte_note or f"vocabulary entry {piece!r} is not in byte-level form"
            return len(piece.encode("utf-8"))
        if self._rule == "sentencepiece":
            if self._spec["model"].get("byte_fallback") and _BYTE_FALLBACK.fullmatch(piece):
                return 1
            return len(piece.replace("▁", " ").encode("utf-8"))
        return len(piece.encode("utf-8"))

    def _compute_byte_lengths(self) -> list[int]:
        model = self._spec["model"]
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] indexed by id
            vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        lengths = [0] * self.vocab_size
        for piece, i in vocab.items():
            lengths[i] = self._piece_bytes(piece)
        unk = model.get("unk_id") if model.get("type") == "Unigram" else vocab.get(model.get("unk_token"))
        if unk is not None:
            lengths[unk] = 0
        for added in self._spec.get("added_tokens", []):  # matched in the raw text, not byte-level
            lengths[added["id"]] = 0 if added["special"] else len(added["content"].encode("utf-8"))
        return lengths

    def byte_lengths(self) -> list[int]:
        return list(self._lengths)


@functools.lru_cache(maxsize=None)
def _load_tiktoken(name: str) -> TiktokenTokenizer:
    import tiktoken

    try:
        return TiktokenTokenizer(tiktoken.get_encoding(name))
    except Exception as e:  # tiktoken downloads on first use; offline that fails
        raise ValueError(
            f"tiktoken could not load encoding {name!r} ({type(e).__name__}: {e}). " + _OFFLINE_HINT
        ) from e


@functools.lru_cache(maxsize=8)
def _load_hf(name_or_folder: str, gguf_file: str | None, name: str | None = None, *,
             local_files_only: bool = False) -> HFTokenizer:
    """AutoTokenizer.from_pretrained, cached: a GGUF tokenizer takes seconds to rebuild. local_files_only:
    a hub name from the local cache only (the hub did not answer: lmloss.hub)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        kwargs["local_files_only"] = True
    hf = AutoTokenizer.from_pretrained(name_or_folder, **kwargs)
    return HFTokenizer(hf, name=name or gguf_file or Path(name_or_folder).name or name_or_folder)


def _load_gguf_tokenizer(spec: str, path: Path, *, cache: bool = True) -> HFTokenizer:
    """The tokenizer stored in a GGUF file's metadata; ValueError naming the file if it is truncated
    or corrupt (the GGUF reader itself raises struct.error, or numpy's mmap error on an empty file).
    cache: build it once and keep its files in lmloss.gguf_cache (~16 s -> ~1 s for SmolLM2's)."""
    try:
        from lmloss.models import check_gguf  # the model loader's header check, where it exists
    except ImportError:
        check_gguf = None
    if check_gguf is not None:
        try:
            check_gguf(str(path))
        except ValueError:
            raise  # it names the file and the fix
        except Exception as e:
            raise _gguf_error(spec, path, e) from e
    from lmloss.gguf_cache import CacheError

    try:
        if cache:
            from lmloss.gguf_cache import load_cached

            return load_cached(path, "tokenizer", lambda folder: _load_hf(str(folder), None, path.name))
        return _load_hf(str(path.parent.resolve()), path.name)
    except ImportError as e:
        raise ValueError(f"loading the tokenizer of {spec!r} needs the gguf package ({e}): "
                         "pip install gguf") from e
    except CacheError:
        raise  # the cache's own problem (LMLOSS_CACHE_MAX_GB, an unwritable folder), said as it is
    except Exception as e:
        raise _gguf_error(spec, path, e) from e


def _gguf_error(spec: str, path: Path, cause: BaseException) -> ValueError:
    kind = type(cause).__name__ if type(cause).__module__ == "builtins" else \
        f"{type(cause).__module__}.{type(cause).__name__}"  # struct.error, not "error"
    return ValueError(
        f"could not read a tokenizer from GGUF file {spec!r} ({path.stat().st_size} bytes): "
        f"{kind}: {cause}. The file may be truncated or corrupt (compare its size and "
        f"sha256 with its source and download it again), or hold no tokenizer. " + _TOKENIZER_FILES_HINT)


def load_tokenizer(spec, *, cache: bool = True) -> Tokenizer:
    """A Tokenizer from a tiktoken encoding name ('gpt2', 'cl100k_base', ...), a local Hugging Face
    folder, a .gguf file, or a Hugging Face hub name, tried in that order. A Tokenizer, a
    tiktoken.Encoding or a Hugging Face tokenizer object is wrapped as is. cache: for a .gguf file,
    keep the built tokenizer's files in lmloss.gguf_cache (False: rebuild it, leave the cache alone)."""
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        if type(spec).__name__ == "Encoding" and hasattr(spec, "encode_ordinary"):
            return TiktokenTokenizer(spec)
        if hasattr(spec, "backend_tokenizer"):
            return HFTokenizer(spec)
        raise TypeError(f"load_tokenizer expects a name or path (str), got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec in TIKTOKEN_NAMES:
        return _load_tiktoken(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {spec!r} does not exist")
        return _load_gguf_tokenizer(spec, path, cache=cache)
    if path.is_dir():
        try:
            return _load_hf(str(path.resolve()), None)
        except Exception as e:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
            hint = "" if _TOKENIZER_FILES_HINT in str(e) else " " + _TOKENIZER_FILES_HINT
            raise ValueError(f"{spec!r} is a folder but holds no usable tokenizer (it holds {found}): "
                             f"{type(e).__name__}: {e}{hint}") from e
    from lmloss.hub import hub_reachable, unreachable_note

    reachable = hub_reachable()  # without it transformers retries for ~50 s offline before its error
    try:
        return _load_hf(spec, None, local_files_only=not reachable)
    except Exception as e:
        why = "" if reachable else f"; {unreachable_note()}, so only the local cache was tried"
        raise ValueError(
            f"unknown tokenizer {spec!r}: it is not a tiktoken encoding ({', '.join(TIKTOKEN_NAMES)}), "
            f"not an existing folder or .gguf file, and the Hugging Face hub could not load it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{why}). " + _OFFLINE_HINT
        ) from e


def token_byte_lengths(tokenizer, *, vocab_size: int | None = None, strict: bool = True) -> torch.Tensor:
    """(V,) int64 tensor: UTF-8 bytes of the text each id stands for (0 for special and unused ids).

    n_bytes = token_byte_lengths(tok)[targets].sum() counts the bytes of the text the targets encode.
    `tokenizer`: a Tokenizer or anything load_tokenizer accepts. vocab_size: pad with zeros to the
    model's vocabulary (embeddings are often padded, e.g. 50257 -> 50304); default the tokenizer's.
    With strict=True a tokenizer that rewrites its input (byte_exact False) raises ValueError
    instead of returning counts that would not add up to the text's bytes.
    """
    tok = load_tokenizer(tokenizer)
    if strict and not tok.byte_exact:
        raise ValueError(
            f"tokenizer {tok.name!r} cannot give exact byte counts: {tok.byte_note}. Count bytes on the "
            "text itself (len(text.encode('utf-8'))), or pass strict=False to accept approximate counts.")
    lengths = tok.byte_lengths()
    if vocab_size is not None:
        if vocab_size < len(lengths):
            raise ValueError(f"vocab_size={vocab_size} is smaller than tokenizer {tok.name!r}'s "
                             f"{len(lengths)} ids; pass the model's vocabulary size (>= {len(lengths)})")
        lengths = lengths + [0] * (vocab_size - len(lengths))
    return torch.tensor(lengths, dtype=torch.long)


def check_byte_lengths(tokenizer, text: str, ids: list[int] | None = None) -> int:
    """len(text.encode("utf-8")), after checking that the byte lengths of `ids` (default
    tokenizer.encode(text)) add up to it; ValueError with both totals if they do not."""
    tok = load_tokenizer(tokenizer)
    ids = tok.encode(text) if ids is None else ids
    lengths = tok.byte_lengths()
    n_token_bytes = sum(lengths[i] for i in ids)
    n_bytes = len(text.encode("utf-8"))
    if n_token_bytes != n_bytes:
        zero = sum(1 for i in ids if lengths[i] == 0)
        raise ValueError(
            f"tokenizer {tok.name!r}: the {len(ids)} tokens of this text stand for {n_token_bytes} bytes, "
            f"the text has {n_bytes} ({zero} tokens count 0 bytes, e.g. <unk>). "
            f"{tok.byte_note or 'The tokenizer does not reproduce its input byte for byte.'}")
    return n_bytes
