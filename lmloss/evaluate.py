"""The evaluation loop: documents -> token windows -> batched forward passes -> exact float64 sums.

    result = evaluate(load_model("gpt2"), load_tokenizer("gpt2"), load_corpus("wikitext"))
    result.totals.bits_per_byte, result.documents[0]["nll_nats"]

Windows of consecutive documents are sorted by length (longest first, ties in plan order) and
batched with right padding. Under a causal mask a real token only attends to the real tokens
before it, so padding changes no scored logit, and pad positions are never scored; results do not
depend on the batch size beyond float rounding of the matrix products. Only the scored positions go through the
output head: the fused `linear_token_nll` where the model exposes its head, else `token_nll` on
logits of those rows. Per-window sums are taken in float64 and added per document in one fixed
order, so totals are deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from lmloss.checkpoint import check_rows, text_sha256
from lmloss.metrics import LossTotals
from lmloss.windows import Window, plan_windows

__all__ = ["EvalResult", "evaluate", "score_windows", "bootstrap_ci", "check_tokenizer_fits"]

_HEAD_ROWS = 2048  # rows of logits built at once on the logits path: 2048 x V floats
_GROUP_BATCHES = 16  # batches per group of documents sorted together (_batch_order)


@dataclass
class EvalResult:
    """Totals over all documents, one row per document, and what produced them."""

    totals: LossTotals
    documents: list[dict]  # index, name, nll_nats, n_tokens, n_bytes, n_words, n_chars
    config: dict
    windows: list[Window] = field(default_factory=list)
    window_nll_nats: list[float] = field(default_factory=list)  # per window, plan order
    position_nll_nats: list[float] = field(default_factory=list)  # summed by input position
    position_count: list[int] = field(default_factory=list)
    token_nll: list[torch.Tensor] | None = None  # per document, float32, in target order
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    resumed_documents: int = 0  # rows restored from done_rows, not scored in this call

    @property
    def tokens_per_s(self) -> float:
        return self.totals.n_tokens / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def metrics(self) -> dict:
        return self.totals.metrics()


def bootstrap_ci(documents: Sequence[dict], *, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict:
    """Percentile bootstrap over documents: {metric: (low, high)} for bits_per_byte and the
    perplexities, each a ratio of sums over a resample of documents drawn with replacement.
    Empty with fewer than 2 documents (one document has no spread to resample)."""
    import numpy as np

    if len(documents) < 2:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(documents), size=(n_resamples, len(documents)))
    nll = np.array([d["nll_nats"] for d in documents], dtype=np.float64)[idx].sum(axis=1)
    alpha = (1.0 - level) / 2
    out = {}
    ratios = (("token_perplexity", "n_tokens", None), ("byte_perplexity", "n_bytes", None),
              ("word_perplexity", "n_words", None), ("bits_per_byte", "n_bytes", math.log(2)))
    for metric, key, scale in ratios:
        denom = np.array([d[key] for d in documents], dtype=np.float64)[idx].sum(axis=1)
        if (denom <= 0).any():
            continue
        ratio = nll / denom
        values = ratio / scale if scale else np.exp(ratio)
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        out[metric] = (float(lo), float(hi))
    return out


def _batch_tensors(batch: list[Window], tokens: Sequence[Sequence[int]], device):
    """Right-padded inputs (B, T), the flat (batch, position) of every scored target, and the targets."""
    width = max(w.n_inputs for w in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, w in enumerate(batch):
        doc = tokens[w.doc]
        inputs = w.inputs(doc)
        ids[b, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        first = w.n_inputs - w.n_scored
        rows += [b] * w.n_scored
        cols += range(first, w.n_inputs)
        targets += doc[w.scored.start:w.scored.stop]
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), as_long(rows), as_long(cols), as_long(targets)


def _head_fused(hidden, head, targets) -> torch.Tensor:
    """lmloss.linear_token_nll: the loss straight from hidden states, never all logits at once."""
    import lmloss

    return lmloss.linear_token_nll(hidden, head.weight, targets, bias=head.bias, softcap=head.softcap)


def _head_logits(hidden, head, targets) -> torch.Tensor:
    """Logits of the scored rows only, _HEAD_ROWS at a time, then lmloss.token_nll."""
    import lmloss

    parts = [lmloss.token_nll(head.logits(hidden[i:i + _HEAD_ROWS]), targets[i:i + _HEAD_ROWS])
             for i in range(0, hidden.shape[0], _HEAD_ROWS)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


HEAD_IMPLS = {"fused": _head_fused, "logits": _head_logits}


def _scored_nll(model, ids, rows, cols, targets, state: dict) -> torch.Tensor:
    """Per-token NLL (M,) float32 of the scored positions (rows[k], cols[k]) only."""
    import lmloss

    if model.head is None:
        logits = model(ids)  # (B, T, V)
        # Each window's scored positions are one contiguous run of its row: score views of the
        # logits, never an indexed copy (8 GiB at Gemma's 262,144 classes x 8 x 1024).
        parts, k = [], 0
        for b, n in enumerate(torch.bincount(rows, minlength=ids.shape[0]).tolist()):
            if n:
                first = int(cols[k])
                parts.append(lmloss.token_nll(logits[b, first:first + n], targets[k:k + n]))
                k += n
        return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    hidden = model.hidden_states(ids)[rows, cols]  # (M, d)
    if state["head_impl"] == "fused":
        try:
            return _head_fused(hidden, model.head, targets)
        except NotImplementedError:
            state["head_impl"] = "logits"
            state["notes"].append("lmloss.linear_token_nll is not available: scoring from logits "
                                  "of the scored rows")
    return HEAD_IMPLS[state["head_impl"]](hidden, model.head, targets)


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


def score_windows(model, tokens: Sequence[Sequence[int]], windows: Sequence[Window], *,
                  batch_size: int = 8, head_impl: str = "fused", notes: list | None = None,
                  skip: frozenset[int] = frozenset()) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Yield (window indices, per-token NLL of each window's scored targets (float32, CPU)) per batch.

    Windows are taken in groups of consecutive documents, longest first within a group (ties in
    the given order), `batch_size` at a time: little padding, and documents finish as the run goes.
    The batches depend only on `windows` and `batch_size`. `skip`: window indices whose results are
    not needed; a batch of skipped windows only is not computed, a batch holding any other window
    is computed whole, so every window gets the numbers it gets in a run without `skip`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if head_impl not in HEAD_IMPLS:
        raise ValueError(f"unknown head_impl {head_impl!r}; expected one of {sorted(HEAD_IMPLS)}")
    order = _batch_order(windows, group_size=_GROUP_BATCHES * batch_size)
    state = {"notes": notes if notes is not None else [], "head_impl": head_impl}
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            if skip and all(i in skip for i in idx):
                continue
            batch = [windows[i] for i in idx]
            ids, rows, cols, targets = _batch_tensors(batch, tokens, model.device)
            nll = _scored_nll(model, ids, rows, cols, targets, state).float().cpu()
            yield idx, list(nll.split([w.n_scored for w in batch]))


def _check_documents(documents) -> None:
    fields = ("text", "n_bytes", "n_words", "n_chars")
    missing = [n for n in fields if documents and not hasattr(documents[0], n)]
    if missing:
        raise TypeError(f"documents must be lmloss Documents (with .text, .n_bytes, .n_words, .n_chars); got "
                        f"{type(documents[0]).__name__} without {missing}; use lmloss.load_corpus(...)")


def _text_ids_limit(tokenizer) -> int:
    """1 + the largest id the tokenizer can emit for plain text: ids with a byte length (special and
    unused ids count 0 bytes and never come out of encode()), else its whole vocabulary."""
    lengths = tokenizer.byte_lengths() if hasattr(tokenizer, "byte_lengths") else None
    if not lengths:
        return int(tokenizer.vocab_size)
    return 1 + max((i for i, n in enumerate(lengths) if n > 0), default=-1)


def check_tokenizer_fits(tokenizer, model_vocab: int | None, model_name: str = "the model") -> None:
    """ValueError unless the tokenizer's text ids index the model's embedding and its vocabulary is
    the model's up to padding: tokenizer.vocab_size >= model_vocab - max(1024, 2% of model_vocab)
    (checkpoints pad embeddings to a multiple of 64-1024: 50257 -> 50304, 50295 -> 51200)."""
    if not model_vocab:
        return
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    limit = _text_ids_limit(tokenizer)
    fix = "pass --tokenizer with the model's own tokenizer (or drop --tokenizer to use it)"
    if limit > model_vocab:
        raise ValueError(f"tokenizer {name!r} emits ids up to {limit - 1}, but {model_name} has "
                         f"{model_vocab} embedding rows: it is not this model's tokenizer; {fix}")
    if tokenizer.vocab_size < model_vocab - max(1024, model_vocab // 50):
        raise ValueError(f"tokenizer {name!r} has {tokenizer.vocab_size} ids, but {model_name} has a "
                         f"vocabulary of {model_vocab}: more than padding apart, so it is not this "
                         f"model's tokenizer; {fix}")


def _tokenize(tokenizer, documents, doc_ids, vocab_size: int) -> list:
    """Token ids of each document; ValueError for text that encodes to nothing or to ids past the
    model's embedding (either would give a number that is not the model's loss on the text)."""
    from lmloss.tokenizers import Tokenizer, encode_document

    tokens = []
    for k, d in zip(doc_ids, documents):
        # An lmloss Tokenizer encodes long texts in pieces (bounded memory, the same ids).
        if isinstance(tokenizer, Tokenizer):
            ids = encode_document(tokenizer, d.text)
        else:
            ids = tokenizer.encode(d.text)
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        if d.text and not len(ids):
            raise ValueError(f"tokenizer {name!r} encodes document {k} ({len(d.text)} characters, "
                             f"{d.text[:40]!r}...) to no tokens: it is not a working tokenizer for this "
                             "text; pass the model's own tokenizer")
        top = max(ids, default=0)
        if top >= vocab_size:
            raise ValueError(f"tokenizer {name!r} gives id {top} in document {k}, past the model's "
                             f"{vocab_size} embedding rows: pass the model's own tokenizer")
        tokens.append(ids)
    return tokens


def evaluate(model, tokenizer, documents: Sequence, *, plan: str = "lm-eval",
             max_length: int | None = None, stride: int | None = None, prefix_id: int | None = None,
             every_window: bool = False, batch_size: int = 8, head_impl: str = "fused",
             keep_token_nll: bool = False, progress: bool = True,
             on_document: Callable[[dict], None] | None = None,
             indices: Sequence[int] | None = None,
             done_rows: Mapping[int, dict] | None = None) -> EvalResult:
    """Score every token of every document once; float64 sums per document and overall.

    model: a LoadedModel (lmloss.load_model) or a transformers causal LM (wrapped on its device).
    tokenizer: lmloss Tokenizer (encode without specials, bos_id, eos_id). documents: Documents.
    plan, max_length (default: the model's context), stride, every_window: see lmloss.windows.
    prefix_id: what the first token is predicted from; default BOS, else EOS, for "lm-eval" and
    every_window (for "sliding" the first token is then context only, as in the HF guide).
    head_impl: "fused" or "logits" (see score_windows).
    on_document(row) is called as soon as a document's last window is scored.
    indices: score only documents[i] for i in indices (a rank's shard); rows keep the documents'
    indices in the whole corpus.
    done_rows: {index: row} of documents scored before (a checkpoint's rows). Each is checked
    against its document (text hash, counts, tokens under this plan) and returned as is. The
    batches are those of the run without done_rows, and a batch holding any unfinished document
    is computed whole, so the other documents' numbers are bit-identical to that run's (same
    device, dtype, batch size and thread count; a document's loss moves by float rounding, ~1e-6
    relative, when it is batched with other neighbours).
    ValueError for a run that would score no token, and for a tokenizer that does not fit the model.
    """
    from lmloss.models import LoadedModel, load_model

    start = time.perf_counter()  # tokenizing counts, as it does in lm-eval's loglikelihood_rolling
    if not isinstance(model, LoadedModel):
        param = next(model.parameters())
        model = load_model(model, device=str(param.device), dtype=str(param.dtype).removeprefix("torch."))
    _check_documents(documents)
    done_rows = dict(done_rows or {})
    check_rows(done_rows, documents)
    doc_ids = list(range(len(documents))) if indices is None else [int(i) for i in indices]
    documents = [documents[i] for i in doc_ids]
    ctx = model.context_length
    max_length = ctx if max_length is None else max_length
    if max_length is None:
        raise ValueError("the model's config states no context length: pass max_length")
    if ctx is not None and max_length > ctx:
        raise ValueError(f"max_length {max_length} is above the model's context length {ctx}; "
                         f"pass max_length <= {ctx}")
    if prefix_id is None and (plan == "lm-eval" or every_window):
        prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    check_tokenizer_fits(tokenizer, model.vocab_size, model.name)
    tokens = _tokenize(tokenizer, documents, doc_ids, model.vocab_size)
    windows = plan_windows([len(t) for t in tokens], plan=plan, max_length=max_length, stride=stride,
                           prefix_id=prefix_id, every_window=every_window)
    config = dict(model=model.name, tokenizer=getattr(tokenizer, "name", None), plan=plan,
                  max_length=max_length, stride=stride, prefix_id=prefix_id, every_window=every_window,
                  batch_size=batch_size, head_impl=head_impl, device=str(model.device),
                  dtype=str(model.dtype).removeprefix("torch."), n_documents=len(documents),
                  n_windows=len(windows))
    done = {k: done_rows[i] for k, i in enumerate(doc_ids) if i in done_rows}
    result = _run(model, documents, tokens, windows, config, start, batch_size=batch_size,
                  head_impl=head_impl, keep_token_nll=keep_token_nll, progress=progress,
                  on_document=on_document, doc_ids=doc_ids, done=done)
    if documents and result.totals.n_tokens == 0:
        raise ValueError(f"no token to score: the {len(documents)} documents encode to "
                         f"{sum(map(len, tokens))} tokens under this plan; pass a corpus with text")
    return result


def _run(model, documents, tokens, windows, config, start, *, batch_size, head_impl, keep_token_nll,
         progress, on_document, doc_ids, done) -> EvalResult:
    """The loop proper: score batches, fold per-window sums into per-document float64 sums.
    done: {position in documents: row} of documents restored, not scored."""
    from tqdm.auto import tqdm

    n_docs = len(documents)
    doc_windows: list[list[int]] = [[] for _ in range(n_docs)]
    for i, w in enumerate(windows):
        doc_windows[w.doc].append(i)
    for k, row in done.items():
        n_scored = sum(windows[i].n_scored for i in doc_windows[k])
        if row["n_tokens"] != n_scored:
            raise ValueError(f"checkpoint row for document {doc_ids[k]} says {row['n_tokens']} tokens, "
                             f"this run scores {n_scored} for it: the checkpoint does not belong to "
                             "this corpus and plan. Pass --overwrite to start over.")
    skip = frozenset(i for k in done for i in doc_windows[k])
    pending = [len(mine) for mine in doc_windows]  # windows left per document
    window_nll = [0.0] * len(windows)
    per_token: list = [None] * len(windows)
    pos_sum = torch.zeros(config["max_length"], dtype=torch.float64)  # by input position
    pos_count = torch.zeros(config["max_length"], dtype=torch.int64)
    rows: list[dict | None] = [done.get(k) for k in range(n_docs)]
    notes = list(model.notes)
    if done:
        notes.append(f"{len(done)} documents restored from a checkpoint: their sums are in the totals, "
                     "their tokens are not in the per-position sums or the per-token NLL")
    bar = tqdm(total=sum(w.n_scored for i, w in enumerate(windows) if i not in skip), unit="tok",
               unit_scale=True, disable=not progress, desc="scoring", dynamic_ncols=True)

    def finish(doc: int) -> None:
        mine = doc_windows[doc]
        nll = 0.0
        for i in mine:  # plan order: a fixed summation order whatever the batch size
            nll += window_nll[i]
        d = documents[doc]
        rows[doc] = dict(index=doc_ids[doc], name=getattr(d, "name", ""), nll_nats=nll,
                         n_tokens=sum(windows[i].n_scored for i in mine),
                         n_bytes=d.n_bytes, n_words=d.n_words, n_chars=d.n_chars,
                         text_sha256=text_sha256(d.text))
        if on_document is not None:
            on_document(rows[doc])

    for doc in range(n_docs):
        if pending[doc] == 0 and doc not in done:  # an empty document: nothing to score, still a row
            finish(doc)
    for idx, nlls in score_windows(model, tokens, windows, batch_size=batch_size,
                                   head_impl=head_impl, notes=notes, skip=skip):
        for i, nll in zip(idx, nlls):
            if i in skip:
                continue
            w = windows[i]
            nll64 = nll.double()
            window_nll[i] = nll64.sum().item()
            if not math.isfinite(window_nll[i]):
                raise ValueError(f"non-finite loss in document {doc_ids[w.doc]}, window {i} ({w}): check "
                                 "the model's logits (dtype overflow, NaN weights)")
            first = w.n_inputs - w.n_scored
            pos_sum[first:first + w.n_scored] += nll64
            pos_count[first:first + w.n_scored] += 1
            if keep_token_nll:
                per_token[i] = nll
            pending[w.doc] -= 1
            if pending[w.doc] == 0:
                finish(w.doc)
        bar.update(sum(windows[i].n_scored for i in idx if i not in skip))
    bar.close()
    elapsed = time.perf_counter() - start
    totals = LossTotals.from_rows(rows)
    token_nll = None
    if keep_token_nll:
        token_nll = [torch.cat([per_token[i] for i in doc_windows[d]]) if doc_windows[d] and d not in done
                     else torch.zeros(0) for d in range(n_docs)]
    return EvalResult(totals, rows, config, list(windows), window_nll, pos_sum.tolist(), pos_count.tolist(),
                      token_nll, elapsed, notes, resumed_documents=len(done))
