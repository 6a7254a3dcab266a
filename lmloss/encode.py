"""Encoding whole documents: the ids of tokenizer.encode(text), computed in pieces cut where the
cut cannot change them (bounded memory on texts of any length), and for a corpus, the pieces of all
its documents encoded in parallel threads.

    ids = lmloss.encode_document(tok, text)            # array('i'), == tok.encode(text)
    per_doc = lmloss.encode_documents(tok, texts)      # == [encode_document(tok, t) for t in texts]
"""

from __future__ import annotations

import os
import re
from array import array
from typing import Iterator, Sequence

from lmloss.tokenizers import Tokenizer, load_tokenizer

__all__ = ["encode_document", "encode_documents"]

# A candidate cut starts the right piece with " " + non-space after a non-space, or with a letter or
# digit right after "\n" that follows a non-space. Python's \s holds all of Unicode White_Space (the
# \s of tiktoken's and Hugging Face's regexes) and \x1c-\x1f besides, so \S here is never whitespace
# there.
_CANDIDATE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=[^\W_])")
_CUT_CONTEXT_CHARS = 256  # text each side of a cut that verification encodes whole and in halves
_CUT_TRIES = 8  # candidates verified before the piece is made longer by piece_chars


def encode_document(tokenizer, text: str, *, piece_chars: int = 1 << 16) -> array:
    r"""Same as array("i", tokenizer.encode(text)), id for id, computed in pieces of about
    piece_chars characters cut at safe boundaries, so that memory stays the text, its ids (4 bytes
    each) and one piece's worth of tokenizer state. `tokenizer`: a Tokenizer or anything
    load_tokenizer accepts. A text of up to piece_chars characters is encoded in one call.

    Why: one Hugging Face encode() holds offsets and strings for every token, 150-190 bytes per
    character (a 20 MB line: 2.2 GB; pieces of 1 << 16: 29 MB, of 1 << 20: 150 MB), and both
    backends return a Python list (~36 bytes per id).

    The identity relied on: encode(x + y) == encode(x) + encode(y) when no pre-token spans the cut,
    since BPE then merges within the same pre-tokens either way. Candidate cuts: a single " " between
    two non-spaces (the space starts the right piece), and the point after a "\n" that lies between
    a non-space and a letter or digit. The pre-tokenizer regexes of GPT-2 (also SmolLM2's byte-level
    BPE: 's|'t|..| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), cl100k_base / Llama-3
    ('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|..|\s*[\r\n]|\s+(?!\S)|\s) and o200k_base never
    hold a non-space followed by a space (a space only starts a pre-token or sits in a whitespace
    run), nor a "\n" followed by a letter or digit. Both neighbours must be non-spaces: in "\n\nA"
    or "  A", \s+(?!\S) and \s*[\r\n]+ group the whitespace run differently where a piece ends it;
    and o200k's " ?[^\s\p{L}\p{N}]+[\r\n/]*" makes ".\n/" one pre-token, hence no cut before "/".

    Tokenizers without such a pre-tokenizer (SentencePiece BPE: Llama-2, Gemma) or that prepend a
    dummy-prefix "▁" to every call break the identity, so each cut is verified on the tokenizer
    itself: a window of ~256 characters each side (edges moved to candidate cuts) must give
    encode(window) == encode(left) + encode(right), else the next candidate is tried; after 8
    refusals the piece grows by piece_chars, up to the whole text in one call where no cut passes.
    """
    tok = load_tokenizer(tokenizer)
    if not isinstance(text, str):
        raise TypeError(f"encode_document expects text as str, got {type(text).__name__}; "
                        "decode bytes first: text.decode('utf-8')")
    _check_piece_chars(piece_chars)
    ids = array("i")
    for start, stop in _pieces(tok, text, piece_chars):
        ids.extend(tok.encode(text[start:stop]))  # the whole text: text[0:len(text)] is text itself
    return ids


def encode_documents(tokenizer, texts: Sequence[str], *, piece_chars: int = 1 << 16,
                     batch_chars: int | None = None) -> list[array]:
    """[encode_document(tokenizer, t, piece_chars=piece_chars) for t in texts], id for id, with the
    pieces of all texts encoded together in parallel threads (tokenizer.encode_batch: Hugging Face's
    Rust thread pool, tiktoken's threads), batch_chars characters at a time (default two pieces'
    worth per CPU core, 4 to 32 pieces: Hugging Face's state for 32 pieces of 1 << 16 characters is
    300-400 MB), so that memory stays one batch's tokenizer state beside the ids. A corpus of many
    pages tokenizes about as fast as the machine has cores, not as one core encodes them one by one
    (WikiText-2's 62 test pages, GPT-2's Hugging Face tokenizer: 0.67 s against 1.2-1.8 s on 2 cores)."""
    tok = load_tokenizer(tokenizer)
    if isinstance(texts, str):
        raise TypeError("encode_documents expects a sequence of texts, got one str; for one text use "
                        "encode_document(tokenizer, text)")
    _check_piece_chars(piece_chars)
    if batch_chars is not None and (isinstance(batch_chars, bool) or not isinstance(batch_chars, int)
                                    or batch_chars < 1):
        raise ValueError(f"batch_chars must be a positive int (characters per encode_batch call) or None, "
                         f"got {batch_chars!r}")
    texts = list(texts)
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode_documents expects texts as str, got {type(text).__name__} at index "
                            f"{k}; decode bytes first: text.decode('utf-8')")
    if batch_chars is None:
        batch_chars = piece_chars * min(32, max(4, 2 * (os.cpu_count() or 1)))
    out = [array("i") for _ in texts]
    batch: list[tuple[int, int, int]] = []  # (text index, start, stop), in text order
    size = 0

    def flush() -> None:
        if not batch:
            return
        for (k, _, _), ids in zip(batch, tok.encode_batch([texts[k][a:b] for k, a, b in batch])):
            out[k].extend(ids)
        batch.clear()

    for k, text in enumerate(texts):
        for start, stop in _pieces(tok, text, piece_chars):
            batch.append((k, start, stop))
            size += stop - start
            if size >= batch_chars:
                flush()
                size = 0
    flush()
    return out


def _check_piece_chars(piece_chars) -> None:
    if isinstance(piece_chars, bool) or not isinstance(piece_chars, int) or piece_chars < 1:
        raise ValueError(f"piece_chars must be a positive int (characters per encode call), got "
                         f"{piece_chars!r}; the default is {1 << 16}")


def _pieces(tok, text: str, piece_chars: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the pieces encode_document encodes text in: cut at _next_cut, in order,
    covering text; one piece (0, len(text)) for a text of up to piece_chars characters ("" too)."""
    start = 0
    while len(text) - start > piece_chars:
        cut = _next_cut(tok, text, start, piece_chars)
        if cut is None:
            break
        yield start, cut
        start = cut
    yield start, len(text)


def _next_cut(tok: Tokenizer, text: str, start: int, piece_chars: int) -> int | None:
    """The first candidate cut at or after start + piece_chars that _cut_is_exact accepts, trying
    _CUT_TRIES candidates, then _CUT_TRIES more a further piece_chars on, ...; None: encode the rest."""
    target = start + piece_chars
    while target < len(text):
        cut = target
        for n_tried, match in enumerate(_CANDIDATE_CUT.finditer(text, target), start=1):
            cut = match.start()
            if _cut_is_exact(tok, text, start, cut):
                return cut
            if n_tried == _CUT_TRIES:
                break
        else:
            return None  # no candidate left
        target = max(target + piece_chars, cut + 1)
    return None


def _cut_is_exact(tok: Tokenizer, text: str, start: int, cut: int) -> bool:
    """encode(text[lo:hi]) == encode(text[lo:cut]) + encode(text[cut:hi]) for a window lo < cut < hi
    of about _CUT_CONTEXT_CHARS each side, lo >= start, both edges moved out to candidate cuts where
    one lies within another _CUT_CONTEXT_CHARS (so that the window starts and ends as pieces do)."""
    ctx = _CUT_CONTEXT_CHARS
    lo = max(start, cut - ctx)
    earlier = [m.start() for m in _CANDIDATE_CUT.finditer(text, max(start, lo - ctx), lo + 2)]
    lo = max([c for c in earlier if c <= lo], default=lo)
    hi = min(len(text), cut + ctx)
    match = _CANDIDATE_CUT.search(text, hi, hi + ctx + 2)
    hi = match.start() if match else hi
    whole = list(tok.encode(text[lo:hi]))
    return whole == list(tok.encode(text[lo:cut])) + list(tok.encode(text[cut:hi]))
