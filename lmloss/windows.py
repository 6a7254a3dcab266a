"""Window plans: which tokens each forward pass sees, and which of its predictions are scored.

Pure Python, no torch. A plan cuts each document's token list into windows of at most
`max_length` model inputs so that every target token is scored exactly once:

    "lm-eval"  lm-evaluation-harness's loglikelihood_rolling: disjoint blocks of max_length
               predictions; the first token of a document is predicted from a prefix token (BOS, or
               EOS when the tokenizer has no BOS); every later window is fed the max_length tokens
               before its last prediction (so a short last block gets a long context).
    "sliding"  the Hugging Face perplexity guide: windows of max_length inputs whose starts move
               by `stride`; each window scores only the predictions no earlier window made.
               Token-weighted when summed; the first token of the sequence is context only
               unless a prefix token is given.

    "chunks"   llama.cpp's llama-perplexity and the GPTQ/AWQ papers' wikitext2 loop: each document's
               tokens cut into disjoint chunks of max_length, the remainder dropped; a chunk's first
               `score_from` predictions are context only, the rest scored (llama.cpp: score_from =
               max_length // 2, so max_length - score_from - 1 per chunk; GPTQ: 0, max_length - 1).
               With a prefix token it is written over each chunk's first token (llama.cpp's BOS).
               `max_chunks` keeps only the first chunks (llama.cpp's --chunks).

`every_window=True` also puts the prefix token at the start of every later window (BOS at every
window); that costs one context token per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Window", "plan_windows", "PLANS"]

PLANS = ("lm-eval", "sliding", "chunks")


@dataclass(frozen=True)
class Window:
    """One forward pass over a slice of document `doc`'s tokens.

        inputs  = [prefix_id] (if given) + tokens[start:stop]
        targets = tokens[start:stop + 1] with a prefix, tokens[start + 1:stop + 1] without
                  (the next token after each input)
        scored  = the last n_scored targets, i.e. tokens[stop + 1 - n_scored:stop + 1]

    The first scored target is predicted from `min_context` inputs, each later one from one more.
    """

    doc: int
    start: int
    stop: int
    n_scored: int
    prefix_id: int | None = None

    @property
    def n_inputs(self) -> int:
        """Model inputs of this window: its sequence length in the forward pass."""
        return self.stop - self.start + (self.prefix_id is not None)

    @property
    def scored(self) -> range:
        """Indices in the document's token list of the targets this window scores."""
        return range(self.stop + 1 - self.n_scored, self.stop + 1)

    @property
    def min_context(self) -> int:
        """Inputs the first scored target is predicted from (prefix token included)."""
        return self.n_inputs - self.n_scored + 1

    def inputs(self, tokens: Sequence[int]) -> list[int]:
        head = [self.prefix_id] if self.prefix_id is not None else []
        return head + list(tokens[self.start:self.stop])

    def targets(self, tokens: Sequence[int]) -> list[int]:
        return list(tokens[self.start + (self.prefix_id is None):self.stop + 1])


def _lm_eval(doc: int, n: int, max_length: int, prefix_id: int, every_window: bool) -> list[Window]:
    """loglikelihood_rolling with context_len=1, after make_disjoint_window (see module docstring)."""
    if n == 0:
        return []
    first = min(max_length, n)
    out = [Window(doc, 0, first - 1, first, prefix_id)]
    predicted = first
    while predicted < n:
        n_pred = min(n - predicted, max_length)
        end = predicted + n_pred  # targets tokens[predicted:end]; the last input is tokens[end - 2]
        if every_window:
            out.append(Window(doc, end - max_length, end - 1, n_pred, prefix_id))
        else:
            out.append(Window(doc, end - 1 - max_length, end - 1, n_pred))
        predicted = end
    return out


def _sliding(doc: int, n: int, max_length: int, stride: int, prefix_id: int | None,
             every_window: bool) -> list[Window]:
    """The HF guide's loop: inputs seq[begin:begin + max_length], begin += stride, new targets only."""
    if every_window:
        # Each window is [prefix] + tokens[begin:end - 1], predicting tokens[begin:end] (all targets).
        out, begin, done = [], 0, 0
        while done < n:
            end = min(begin + max_length, n)
            out.append(Window(doc, begin, end - 1, end - max(done, begin), prefix_id))
            done, begin = end, begin + stride
        return out
    # seq = [prefix] + tokens when the first token is scored, else tokens; offset maps seq -> tokens.
    offset = int(prefix_id is not None)
    seq_len = n + offset
    out, begin, done = [], 0, 1  # done: seq positions [0, done) are predicted or context-only
    while done < seq_len:
        end = min(begin + max_length, seq_len)
        n_scored = end - max(done, begin + 1)
        # The last input of seq[begin:end] predicts nothing inside the window: it is dropped.
        if begin == 0 and offset:
            out.append(Window(doc, 0, end - 2, n_scored, prefix_id))
        else:
            out.append(Window(doc, begin - offset, end - 1 - offset, n_scored))
        # A stride of max_length would leave the token at each boundary without any context (the HF
        # guide's loop skips it): begin at most one before the first unscored position instead.
        done, begin = end, min(begin + stride, end - 1)
    return out


def _chunks(doc: int, n: int, max_length: int, prefix_id: int | None, score_from: int) -> list[Window]:
    """Chunk k holds tokens[k*L:(k+1)*L] (L = max_length), its first token replaced by prefix_id when
    given; its inputs stop one short (the last one predicts past the chunk), its last L - 1 -
    score_from targets are scored."""
    lead = int(prefix_id is not None)  # the prefix stands in for tokens[k*L]
    return [Window(doc, k * max_length + lead, (k + 1) * max_length - 1, max_length - 1 - score_from, prefix_id)
            for k in range(n // max_length)]


def plan_windows(doc_lengths: Sequence[int], *, plan: str = "lm-eval", max_length: int,
                 stride: int | None = None, prefix_id: int | None = None,
                 every_window: bool = False, score_from: int | None = None,
                 max_chunks: int | None = None) -> list[Window]:
    """Windows covering every target of every document exactly once, in document order.

    doc_lengths: tokens per document. plan: "lm-eval" or "sliding" (module docstring).
    max_length: model inputs per window. stride: for "sliding", how far window starts move
    (default max_length // 2). prefix_id: the token the first token of each document is predicted
    from (required by "lm-eval"; for "sliding", None leaves the first token as context only).
    every_window: put prefix_id at the start of every window too.
    score_from, max_chunks: for "chunks", the context-only predictions at the start of each chunk
    (default 0) and how many chunks to keep, counted over all documents (default all).
    """
    if plan not in PLANS:
        raise ValueError(f"unknown window plan {plan!r}; expected one of {PLANS}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if (prefix_id is None) and (plan == "lm-eval" or every_window):
        raise ValueError(f"plan {plan!r}{' with every_window' if every_window else ''} needs "
                         "prefix_id, the token the first token is predicted from (BOS, else EOS)")
    if plan == "sliding":
        stride = max(1, max_length // 2) if stride is None else stride
        if not isinstance(stride, int) or not 1 <= stride <= max_length:
            raise ValueError(f"stride must be an int in [1, max_length={max_length}], got {stride!r}")
        if max_length < 2 and not every_window:
            raise ValueError("the sliding plan needs max_length >= 2: a window of one input "
                             "predicts nothing inside itself; use every_window or a longer window")
    elif stride is not None:
        raise ValueError(f"stride is for plan='sliding'; plan {plan!r} moves by max_length")
    if plan == "chunks":
        score_from = 0 if score_from is None else score_from
        if every_window:
            raise ValueError("plan 'chunks' writes prefix_id over each chunk's first token; every_window "
                             "is for the other plans")
        if max_length < 2:
            raise ValueError(f"plan 'chunks' needs max_length >= 2 (a chunk of one token predicts nothing), "
                             f"got {max_length}")
        if not isinstance(score_from, int) or not 0 <= score_from <= max_length - 2:
            raise ValueError(f"score_from must be an int in [0, max_length - 2 = {max_length - 2}] so that "
                             f"each chunk scores a token, got {score_from!r}")
        if max_chunks is not None and (not isinstance(max_chunks, int) or max_chunks < 1):
            raise ValueError(f"max_chunks must be a positive int or None, got {max_chunks!r}")
    elif score_from is not None or max_chunks is not None:
        raise ValueError(f"score_from and max_chunks are for plan='chunks', not {plan!r}")
    windows = []
    for doc, n in enumerate(doc_lengths):
        if n < 0:
            raise ValueError(f"document {doc} has a negative length {n}")
        if plan == "lm-eval":
            windows += _lm_eval(doc, n, max_length, prefix_id, every_window)
        elif plan == "chunks":
            windows += _chunks(doc, n, max_length, prefix_id, score_from)
        else:
            windows += _sliding(doc, n, max_length, stride, prefix_id, every_window)
    return windows if max_chunks is None else windows[:max_chunks]
