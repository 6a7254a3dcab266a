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
from typing import Callable, Iterator, Sequence

import torch

from lmloss.metrics import LossTotals
from lmloss.windows import Window, plan_windows

__all__ = ["EvalResult", "evaluate", "score_windows", "bootstrap_ci"]

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
                  batch_size: int = 8, head_impl: str = "fused",
                  notes: list | None = None) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Yield (window indices, per-token NLL of each window's scored targets (float32, CPU)) per batch.

    Windows are taken in groups of consecutive documents, longest first within a group (ties in
    the given order), `batch_size` at a time: little padding, and documents finish as the run goes. A caller
    that shards work (one rank's share of `windows`) gets the same per-window numbers.
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


def evaluate(model, tokenizer, documents: Sequence, *, plan: str = "lm-eval",
             max_length: int | None = None, stride: int | None = None, prefix_id: int | None = None,
             every_window: bool = False, batch_size: int = 8, head_impl: str = "fused",
             keep_token_nll: bool = False, progress: bool = True,
             on_document: Callable[[dict], None] | None = None,
             indices: Sequence[int] | None = None) -> EvalResult:
    """Score every token of every document once; float64 sums per document and overall.

    model: a LoadedModel (lmloss.load_model) or a transformers causal LM (wrapped on its device).
    tokenizer: lmloss Tokenizer (encode without specials, bos_id, eos_id). documents: Documents.
    plan, max_length (default: the model's context), stride, every_window: see lmloss.windows.
    prefix_id: what the first token is predicted from; default BOS, else EOS, for "lm-eval" and
    every_window (for "sliding" the first token is then context only, as in the HF guide).
    head_impl: "fused" or "logits" (see score_windows).
    on_document(row) is called as soon as a document's last window is scored.
    indices: score only documents[i] for i in indices (a rank's shard, or what a resumed run has
    left); rows keep the documents' indices in the whole corpus.
    """
    from lmloss.models import LoadedModel, load_model

    start = time.perf_counter()  # tokenizing counts, as it does in lm-eval's loglikelihood_rolling
    if not isinstance(model, LoadedModel):
        param = next(model.parameters())
        model = load_model(model, device=str(param.device), dtype=str(param.dtype).removeprefix("torch."))
    _check_documents(documents)
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
    tokens = [tokenizer.encode(d.text) for d in documents]
    windows = plan_windows([len(t) for t in tokens], plan=plan, max_length=max_length, stride=stride,
                           prefix_id=prefix_id, every_window=every_window)
    config = dict(model=model.name, tokenizer=getattr(tokenizer, "name", None), plan=plan,
                  max_length=max_length, stride=stride, prefix_id=prefix_id, every_window=every_window,
                  batch_size=batch_size, head_impl=head_impl, device=str(model.device),
                  dtype=str(model.dtype).removeprefix("torch."), n_documents=len(documents),
                  n_windows=len(windows))
    return _run(model, documents, tokens, windows, config, start, batch_size=batch_size,
                head_impl=head_impl, keep_token_nll=keep_token_nll, progress=progress,
                on_document=on_document, doc_ids=doc_ids)


def _run(model, documents, tokens, windows, config, start, *, batch_size, head_impl, keep_token_nll,
         progress, on_document, doc_ids) -> EvalResult:
    """The loop proper: score batches, fold per-window sums into per-document float64 sums."""
    from tqdm.auto import tqdm

    n_docs = len(documents)
    doc_windows: list[list[int]] = [[] for _ in range(n_docs)]
    for i, w in enumerate(windows):
        doc_windows[w.doc].append(i)
    pending = [len(mine) for mine in doc_windows]  # windows left per document
    window_nll = [0.0] * len(windows)
    per_token: list = [None] * len(windows)
    pos_sum = torch.zeros(config["max_length"], dtype=torch.float64)  # by input position
    pos_count = torch.zeros(config["max_length"], dtype=torch.int64)
    rows: list[dict | None] = [None] * n_docs
    notes = list(model.notes)
    bar = tqdm(total=sum(w.n_scored for w in windows), unit="tok", unit_scale=True,
               disable=not progress, desc="scoring", dynamic_ncols=True)

    def finish(doc: int) -> None:
        mine = doc_windows[doc]
        nll = 0.0
        for i in mine:  # plan order: a fixed summation order whatever the batch size
            nll += window_nll[i]
        d = documents[doc]
        rows[doc] = dict(index=doc_ids[doc], name=getattr(d, "name", ""), nll_nats=nll,
                         n_tokens=sum(windows[i].n_scored for i in mine),
                         n_bytes=d.n_bytes, n_words=d.n_words, n_chars=d.n_chars)
        if on_document is not None:
            on_document(rows[doc])

    for doc in range(n_docs):
        if pending[doc] == 0:  # an empty document: nothing to score, still a row
            finish(doc)
    for idx, nlls in score_windows(model, tokens, windows, batch_size=batch_size,
                                   head_impl=head_impl, notes=notes):
        for i, nll in zip(idx, nlls):
            w = windows[i]
            nll64 = nll.double()
            window_nll[i] = nll64.sum().item()
            if not math.isfinite(window_nll[i]):
                raise ValueError(f"non-finite loss in document {w.doc}, window {i} ({w}): check the "
                                 "model's logits (dtype overflow, NaN weights)")
            first = w.n_inputs - w.n_scored
            pos_sum[first:first + w.n_scored] += nll64
            pos_count[first:first + w.n_scored] += 1
            if keep_token_nll:
                per_token[i] = nll
            pending[w.doc] -= 1
            if pending[w.doc] == 0:
                finish(w.doc)
        bar.update(sum(windows[i].n_scored for i in idx))
    bar.close()
    elapsed = time.perf_counter() - start
    totals = LossTotals.from_rows(rows)
    token_nll = None
    if keep_token_nll:
        token_nll = [torch.cat([per_token[i] for i in doc_windows[d]]) if doc_windows[d]
                     else torch.zeros(0) for d in range(n_docs)]
    return EvalResult(totals, rows, config, list(windows), window_nll, pos_sum.tolist(), pos_count.tolist(),
                      token_nll, elapsed, notes)
