"""What an evaluation returns: per-document float64 sums (DocumentResult), the run's result
(EvalResult), the bootstrap interval over documents, and the token-statistics sums (entropy, top-1,
rank histogram) with their merge across ranks and corpora.

    result = lmloss.evaluate(model, tok, docs)
    result.totals.bits_per_byte, result.per_document[0].totals.nll_nats, bootstrap_ci(result.per_document)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmloss.metrics import LossTotals
from lmloss.ops.stats import TokenStats
from lmloss.windows import Window

__all__ = ["DocumentResult", "EvalResult", "bootstrap_ci", "RANK_BUCKETS", "StatsSums", "merge_token_stats"]


@dataclass(frozen=True)
class DocumentResult:
    """One document's sums (its scored tokens' NLL and its text's counts) and its identity:
    its index in the corpus and sha256(text)[:16]."""

    index: int
    name: str
    totals: LossTotals
    text_sha256: str

    def to_dict(self) -> dict:
        """The flat row of the results JSON and the checkpoint: index, name, nll_nats, n_tokens,
        n_bytes, n_words, n_chars, text_sha256."""
        return dict(index=self.index, name=self.name, **self.totals.to_dict(), text_sha256=self.text_sha256)

    @classmethod
    def from_dict(cls, row: dict) -> "DocumentResult":
        totals = LossTotals(row["nll_nats"], row["n_tokens"], row["n_bytes"], row["n_words"], row["n_chars"])
        return cls(int(row["index"]), str(row.get("name", "")), totals, row["text_sha256"])


@dataclass
class EvalResult:
    """Totals over all documents, one DocumentResult per document (in document order, every rank's
    and every restored one), and what produced them. windows, window_nll_nats and token_nll are
    this process's, of this call; the position sums are summed over ranks."""

    totals: LossTotals
    per_document: list[DocumentResult]
    config: dict
    windows: list[Window] = field(default_factory=list)
    window_nll_nats: list[float] = field(default_factory=list)  # per window, plan order
    position_nll_nats: list[float] = field(default_factory=list)  # summed by input position
    position_count: list[int] = field(default_factory=list)
    token_nll: dict[int, torch.Tensor] | None = None  # document index -> float32 NLL in target order
    elapsed_s: float = 0.0
    prepare_s: float = 0.0  # of elapsed_s: tokenizing the documents and planning their windows (this process)
    notes: list[str] = field(default_factory=list)
    resumed_documents: int = 0  # restored from the checkpoint, not scored in this call
    window_nll_sq: list[float] = field(default_factory=list)  # per window, sum of squared token NLLs
    token_stats: dict | None = None  # with token_stats=True: sums over the tokens scored in this call
    token_columns: dict[int, dict[str, torch.Tensor]] | None = None  # entropy, rank, argmax per document

    @property
    def tokens_per_s(self) -> float:
        return self.totals.n_tokens / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def metrics(self) -> dict:
        return self.totals.metrics()


def bootstrap_ci(per_document: Sequence[DocumentResult], *, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict:
    """Percentile bootstrap over documents: {metric: (low, high)} for bits_per_byte and the
    perplexities, each a ratio of sums over a resample of documents drawn with replacement.
    Empty with fewer than 2 documents (one document has no spread to resample)."""
    import numpy as np

    if len(per_document) < 2:
        return {}
    sums = [d.totals for d in per_document]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    nll = np.array([t.nll_nats for t in sums], dtype=np.float64)[idx].sum(axis=1)
    alpha = (1.0 - level) / 2
    out = {}
    ratios = (("token_perplexity", "n_tokens", None), ("byte_perplexity", "n_bytes", None),
              ("word_perplexity", "n_words", None), ("bits_per_byte", "n_bytes", math.log(2)),
              ("bits_per_char", "n_chars", math.log(2)))
    for metric, key, scale in ratios:
        denom = np.array([getattr(t, key) for t in sums], dtype=np.float64)[idx].sum(axis=1)
        if (denom <= 0).any():
            continue
        ratio = nll / denom
        values = ratio / scale if scale else np.exp(ratio)
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        out[metric] = (float(lo), float(hi))
    return out


RANK_BUCKETS = ((0, 1, "0"), (1, 2, "1"), (2, 5, "2-4"), (5, 10, "5-9"), (10, 100, "10-99"),
                (100, 1000, "100-999"), (1000, None, ">=1000"))


class StatsSums:
    """Float64 entropy sum, top-1 count and target-rank histogram over scored tokens."""

    def __init__(self):
        self.n_tokens, self.entropy_nats, self.top1 = 0, 0.0, 0
        self.rank_counts = {label: 0 for _, _, label in RANK_BUCKETS}

    def add(self, s: TokenStats) -> None:
        self.n_tokens += s.rank.numel()
        self.entropy_nats += s.entropy.double().sum().item()
        self.top1 += int((s.rank == 0).sum())
        for lo, hi, label in RANK_BUCKETS:
            self.rank_counts[label] += int(((s.rank >= lo) & (s.rank < hi if hi else True)).sum())

    def to_dict(self) -> dict:
        """The sums, and the means they give: mean_entropy_nats = entropy_nats / n_tokens,
        top1_accuracy = top1 / n_tokens."""
        n = self.n_tokens
        return dict(n_tokens=n, entropy_nats=self.entropy_nats, top1=self.top1, rank_counts=dict(self.rank_counts),
                    mean_entropy_nats=self.entropy_nats / n if n else math.nan,
                    top1_accuracy=self.top1 / n if n else math.nan)


def merge_token_stats(parts: Sequence[dict]) -> dict:
    """Several StatsSums.to_dict() (ranks, corpora) as one."""
    total = StatsSums()
    for p in parts:
        total.n_tokens += p["n_tokens"]
        total.entropy_nats += p["entropy_nats"]
        total.top1 += p["top1"]
        for k, v in p["rank_counts"].items():
            total.rank_counts[k] += v
    return total.to_dict()
