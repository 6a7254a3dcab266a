"""Model inputs of a run: documents -> token ids -> windows -> right-padded batches.

    prep = prepare(tok, docs, vocab_size=model.vocab_size, plan="lm-eval", max_length=1024, prefix_id=tok.bos_id)
    for b in batches(prep.windows, prep.tokens, batch_size=8, device=model.device):
        hidden = model.hidden_states(b.ids)[b.rows, b.cols]  # (M, d), M = sum(b.n_scored)
        nll = token_nll(model.head.logits(hidden), b.targets)  # (M,), b.n_scored per window of b.indices

lmloss.evaluate and lmloss.compare.kl_divergence both read their inputs from here, so two models
compared by KL see exactly the windows and batches an evaluation of either one sees.

Batches take the windows in groups of consecutive documents (about GROUP_BATCHES batches each),
longest first within a group (ties in plan order): little padding, and documents finish as the run
goes. Which windows share a batch depends only on the windows and the batch size.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch

from lmloss.windows import Window, plan_windows

__all__ = ["Prepared", "prepare", "Batch", "batches", "check_inputs", "check_counts_scored_bytes"]

GROUP_BATCHES = 16  # batches per group of documents sorted together (_batch_order)


@dataclass(frozen=True)
class Prepared:
    """What a run scores: token ids of each document (in the order given), the windows over them
    (Window.doc indexes `tokens`), and the (bytes, words, chars) each document's sums count."""

    tokens: list[list[int]]
    windows: list[Window]
    counts: list[tuple[int, int, int]]

    def doc_windows(self) -> list[list[int]]:
        """Indices into `windows` of each document's windows, in plan order."""
        out: list[list[int]] = [[] for _ in self.tokens]
        for i, w in enumerate(self.windows):
            out[w.doc].append(i)
        return out


class Batch(NamedTuple):
    """One forward pass: windows[indices] right-padded into ids (B, T), and their scored targets
    (M,) at the flat positions ids[rows[k], cols[k]] (the input each target is predicted from),
    window by window, n_scored[j] of them for window indices[j]."""

    indices: list[int]
    ids: torch.Tensor  # (B, T) int64, 0 past each window's inputs
    rows: torch.Tensor  # (M,) int64
    cols: torch.Tensor  # (M,) int64
    targets: torch.Tensor  # (M,) int64
    n_scored: list[int]


def check_inputs(tokenizer, documents: Sequence, *, bos_in_tokens: bool = False) -> None:
    """TypeError unless documents are lmloss Documents (text and its counts); ValueError for
    bos_in_tokens with a tokenizer that has no BOS. prepare() checks this; a run calls it first,
    before any work."""
    fields = ("text", "n_bytes", "n_words", "n_chars")
    missing = [n for n in fields if documents and not hasattr(documents[0], n)]
    if missing:
        raise TypeError(f"documents must be lmloss Documents (with .text, .n_bytes, .n_words, .n_chars); got "
                        f"{type(documents[0]).__name__} without {missing}; use lmloss.load_corpus(...)")
    if bos_in_tokens and tokenizer.bos_id is None:
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ValueError(f"bos_in_tokens=True, but tokenizer {name!r} has no BOS token; pass bos_in_tokens=False")


def prepare(tokenizer, documents: Sequence, *, vocab_size: int, max_length: int, plan: str = "lm-eval",
            stride: int | None = None, prefix_id: int | None = None, every_window: bool = False,
            score_from: int | None = None, max_chunks: int | None = None, bos_in_tokens: bool = False,
            doc_ids: Sequence[int] | None = None) -> Prepared:
    """Tokenize documents, plan their windows (lmloss.plan_windows, same options) and count what
    their sums stand for: each Document's n_bytes, n_words, n_chars, except under plan "chunks",
    where it is the text of the scored tokens only (bytes, chars; no words).

    vocab_size: the model's embedding rows; an id at or past it is a ValueError, as is a text that
    encodes to nothing. bos_in_tokens: each token list starts with the tokenizer's BOS. doc_ids:
    the documents' indices in the corpus, for error messages (default 0, 1, ...).
    """
    check_inputs(tokenizer, documents, bos_in_tokens=bos_in_tokens)
    doc_ids = range(len(documents)) if doc_ids is None else doc_ids
    tokens = _tokenize(tokenizer, documents, doc_ids, vocab_size, bos_in_tokens)
    windows = plan_windows([len(t) for t in tokens], plan=plan, max_length=max_length, stride=stride,
                           prefix_id=prefix_id, every_window=every_window, score_from=score_from,
                           max_chunks=max_chunks)
    counts = (_scored_counts(tokenizer, documents, tokens, windows) if plan == "chunks" else
              [(d.n_bytes, d.n_words, d.n_chars) for d in documents])
    return Prepared(tokens, windows, counts)


def batches(windows: Sequence[Window], tokens: Sequence[Sequence[int]], *, batch_size: int,
            device: str | torch.device = "cpu", skip: frozenset[int] = frozenset()) -> Iterator[Batch]:
    """Every window once, batch_size windows per Batch, in the order of the module docstring.

    skip: window indices whose results are not needed (a resumed run's finished documents). A
    batch of skipped windows only is not built; a batch holding any other window is built whole,
    so it is the batch a run without skip makes (bit-identical numbers on the same device).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = _batch_order(windows, group_size=GROUP_BATCHES * batch_size)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        if skip and all(i in skip for i in idx):
            continue
        batch = [windows[i] for i in idx]
        yield Batch(idx, *_batch_tensors(batch, tokens, device), [w.n_scored for w in batch])


def _tokenize(tokenizer, documents, doc_ids, vocab_size: int, bos_in_tokens: bool = False) -> list:
    """Token ids of each document, BOS first when bos_in_tokens; ValueError for text that encodes to
    nothing or to ids past the model's embedding (either would give a number that is not the model's
    loss on the text)."""
    from lmloss.encode import encode_documents
    from lmloss.tokenizers import Tokenizer

    # An lmloss Tokenizer encodes long texts in pieces (bounded memory, the same ids), the pieces of
    # all documents in parallel threads.
    encoded = (encode_documents(tokenizer, [d.text for d in documents]) if isinstance(tokenizer, Tokenizer)
               else [tokenizer.encode(d.text) for d in documents])
    tokens = []
    for k, d, ids in zip(doc_ids, documents, encoded):
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        if d.text and not len(ids):
            raise ValueError(f"tokenizer {name!r} encodes document {k} ({len(d.text)} characters, "
                             f"{d.text[:40]!r}...) to no tokens: it is not a working tokenizer for this "
                             "text; pass the model's own tokenizer")
        top = max(ids, default=0)
        if top >= vocab_size:
            raise ValueError(f"tokenizer {name!r} gives id {top} in document {k}, past the model's "
                             f"{vocab_size} embedding rows: pass the model's own tokenizer")
        tokens.append(([tokenizer.bos_id] + list(ids)) if bos_in_tokens else ids)
    return tokens


def check_counts_scored_bytes(tokenizer) -> list[int]:
    """The tokenizer's byte_lengths(), which plan "chunks" needs to count the bytes of the scored
    tokens; ValueError where it has none or they are not exact (a normalizing tokenizer). The command
    lines call it before a model loads."""
    lengths = tokenizer.byte_lengths() if hasattr(tokenizer, "byte_lengths") else None
    if not lengths or not getattr(tokenizer, "byte_exact", True):
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ValueError(f"plan 'chunks' counts the bytes of the scored tokens, and tokenizer {name!r} cannot "
                         f"give exact byte counts ({getattr(tokenizer, 'byte_note', 'no byte lengths')}); "
                         "use plan 'lm-eval' or 'sliding', which count the whole text")
    return lengths


def _scored_counts(tokenizer, documents, tokens, windows) -> list[tuple[int, int, int]]:
    """(bytes, words, chars) of the text each document's scored tokens stand for, for plans that
    score part of a document ("chunks"): a scored run tokens[a:b] is the text's UTF-8 bytes
    [offset[a], offset[b]), offsets being the running sums of the tokens' byte lengths; chars count
    the bytes that start a character in that range. Words are not counted (0): a run may cut a word."""
    lengths = check_counts_scored_bytes(tokenizer)
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    out = [[0, 0, 0] for _ in documents]
    offsets: dict[int, list[int]] = {}
    for w in windows:
        if w.doc not in offsets:
            run = [0]
            for t in tokens[w.doc]:
                run.append(run[-1] + lengths[t])
            raw = documents[w.doc].text.encode("utf-8")
            if run[-1] != len(raw):
                raise ValueError(f"tokenizer {name!r}: the tokens of document {w.doc} stand for {run[-1]} bytes, "
                                 f"its text has {len(raw)}, so the scored bytes cannot be counted; use plan "
                                 "'lm-eval' or 'sliding'")
            offsets[w.doc] = (run, raw)
        run, raw = offsets[w.doc]
        lo, hi = run[w.scored.start], run[w.scored.stop]
        out[w.doc][0] += hi - lo
        out[w.doc][2] += sum(1 for c in raw[lo:hi] if c & 0xC0 != 0x80)
    return [tuple(c) for c in out]


def _batch_order(windows: Sequence[Window], *, group_size: int) -> list[int]:
    """Window indices: documents in order, cut into groups of about group_size windows; within a
    group, longest first so that a batch holds windows of nearly one length."""
    group_of: dict[int, int] = {}
    group, count = 0, 0
    for w in windows:
        if w.doc not in group_of:
            if count >= group_size:
                group, count = group + 1, 0
            group_of[w.doc] = group
        count += 1
    return sorted(range(len(windows)), key=lambda i: (group_of[windows[i].doc], -windows[i].n_inputs))


def _batch_tensors(batch: list[Window], tokens: Sequence[Sequence[int]], device):
    """Right-padded inputs (B, T), the flat (batch, position) of every scored target, and the targets."""
    import numpy as np

    width = max(w.n_inputs for w in batch)
    n_scored = sum(w.n_scored for w in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    rows, cols, targets = (np.empty(n_scored, dtype=np.int64) for _ in range(3))
    k = 0
    for b, w in enumerate(batch):
        doc = _as_numpy(tokens[w.doc])
        head = w.prefix_id is not None
        if head:
            ids[b, 0] = w.prefix_id
        ids[b, head:w.n_inputs] = doc[w.start:w.stop]
        first = w.n_inputs - w.n_scored
        rows[k:k + w.n_scored] = b
        cols[k:k + w.n_scored] = np.arange(first, w.n_inputs)
        targets[k:k + w.n_scored] = doc[w.scored.start:w.scored.stop]
        k += w.n_scored
    return tuple(torch.from_numpy(x).to(device) for x in (ids, rows, cols, targets))


def _as_numpy(ids):
    """A view of array('i') ids (no copy), else numpy's copy of the list."""
    import numpy as np

    return np.frombuffer(ids, dtype=np.int32) if isinstance(ids, array) and ids.itemsize == 4 else np.asarray(ids)
