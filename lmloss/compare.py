"""Models compared on the same text: KL divergence against a reference model that shares the
vocabulary, and paired bits per byte of any models under any tokenizers.

    kl = kl_divergence(load_model("model"), load_model("model.Q4_1.gguf"), tok, docs)
    kl.mean_kl_nats, kl.top1_agreement, kl.summary()["p99_nats"]
    cmp = compare(["gpt2", "SmolLM2.gguf"], docs)    # each model with its own tokenizer, one loaded at a time
    cmp.paired.pairs[0].delta_bits_per_byte, cmp.paired.pairs[0].ci

KL: both models read the same windows in lockstep; at every scored position
    kl = sum_v P_ref(v) * (log P_ref(v) - log P(v))     nats, P = softmax(logits), lmloss.ops.kl.token_kl
and only O(1) numbers per position are kept (kl, p(target) of each, whether the argmaxes agree), so
memory is that of one batch's logits in row chunks of about 64 MiB per model, never N x V. The
statistics are llama.cpp's `llama-perplexity --kl-divergence`: mean KL (token-weighted over every
scored position), its percentiles, "same top p" (top-1 agreement), and delta_p = p(target) - p_ref(target).

Paired: every model scores the same documents (lmloss.evaluate), and a bootstrap over documents
draws the document indices once per resample and applies them to every model, so the interval of
a difference excludes the spread the models share (which documents are hard).
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lmloss.evaluate import check_tokenizer_fits, default_batch_size, resolve_window
from lmloss.results import DocumentResult, EvalResult
from lmloss.metrics import LossTotals
from lmloss.prepare import batches, check_inputs, prepare

__all__ = ["KLDocument", "KLResult", "kl_divergence", "PairDelta", "PairedComparison", "paired_bootstrap",
           "Comparison", "compare", "tokenizer_difference", "PERCENTILES"]

LOGITS_BYTES = 64 << 20  # float32 logits built at once per model: rows = LOGITS_BYTES // (4 * V)
PERCENTILES = {"median_nats": 50.0, "p90_nats": 90.0, "p99_nats": 99.0, "p999_nats": 99.9}
PROBE_TEXT = ("The quick brown fox, 1234567890 + 3.14 = x; naïve café Ünïcödé 日本語 テキスト 🤗 emoji\n"
              "\tdef f(x):  return x**2  # code\r\n<|endoftext|> <s> </s> [CLS] https://example.org/a?b=c")


# -- same vocabulary ---------------------------------------------------------------------------------

def tokenizer_difference(a, b) -> str:
    """"" when tokenizers a and b give the same ids: same vocab_size, same ids for PROBE_TEXT, same
    UTF-8 byte length for every id, and the same decoding of every (V // 512)-th id; else what differs."""
    name_a, name_b = (getattr(t, "name", type(t).__name__) for t in (a, b))
    if a is b:
        return ""
    if a.vocab_size != b.vocab_size:
        return f"tokenizer {name_a!r} has {a.vocab_size} ids, {name_b!r} has {b.vocab_size}"
    ids_a, ids_b = list(a.encode(PROBE_TEXT)), list(b.encode(PROBE_TEXT))
    if ids_a != ids_b:
        k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        return (f"tokenizers {name_a!r} and {name_b!r} encode a probe text differently ({len(ids_a)} vs "
                f"{len(ids_b)} ids, first difference at id {k})")
    if hasattr(a, "byte_lengths") and hasattr(b, "byte_lengths") and a.byte_lengths() != b.byte_lengths():
        return f"tokenizers {name_a!r} and {name_b!r} give some ids different byte lengths"
    decodes = hasattr(a, "decode") and hasattr(b, "decode")
    for i in range(0, a.vocab_size, max(1, a.vocab_size // 512)) if decodes else ():
        if a.decode([i]) != b.decode([i]):
            return f"tokenizers {name_a!r} and {name_b!r} decode id {i} differently"
    return ""


def _check_same_vocabulary(reference, model) -> None:
    """ValueError unless both output heads have the same number of classes (KL needs one support)."""
    if reference.vocab_size != model.vocab_size:
        raise ValueError(f"KL divergence needs one vocabulary, but the reference {reference.name!r} has "
                         f"{reference.vocab_size} output classes and the model {model.name!r} has "
                         f"{model.vocab_size}: compare models with different vocabularies by bits per byte "
                         "(lmloss compare-models --models A,B)")
    if reference.device != model.device:
        raise ValueError(f"the reference is on {reference.device} and the model on {model.device}: load both "
                         "on one device")


# -- paired bootstrap over documents -----------------------------------------------------------------

@dataclass(frozen=True)
class PairDelta:
    """Model b against model a (indices into the models): delta = bpb(b) - bpb(a) of the pooled sums;
    ci its paired percentile interval (None with < 2 documents or no resamples); b better on
    n_b_better of the n_documents with bytes (its per-document bpb strictly lower)."""

    a: int
    b: int
    delta_bits_per_byte: float
    ci: tuple[float, float] | None
    n_b_better: int
    n_documents: int

    @property
    def share_b_better(self) -> float:
        return self.n_b_better / self.n_documents if self.n_documents else math.nan


@dataclass(frozen=True)
class PairedComparison:
    """Pooled bits per byte of each model with its interval, and every pair (a, b), a < b, in order."""

    bits_per_byte: list[float]
    bits_per_byte_ci: list[tuple[float, float] | None]
    pairs: list[PairDelta]
    n_resamples: int
    level: float
    seed: int


def _doc_sums(row) -> tuple[float, int, str | None]:
    """(nll_nats, n_bytes, text_sha256 or None) of a DocumentResult, LossTotals or results-JSON row."""
    if isinstance(row, DocumentResult):
        return row.totals.nll_nats, row.totals.n_bytes, row.text_sha256
    if isinstance(row, LossTotals):
        return row.nll_nats, row.n_bytes, None
    if isinstance(row, dict):
        return float(row["nll_nats"]), int(row["n_bytes"]), row.get("text_sha256")
    raise TypeError(f"a document's sums must be a DocumentResult, a LossTotals or a dict with nll_nats and "
                    f"n_bytes, got {type(row).__name__}")


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])  # numpy's default "linear" interpolation
    return float(lo), float(hi)


def paired_bootstrap(per_model_docs: Sequence[Sequence], n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> PairedComparison:
    """Pooled bpb per model and delta bpb per pair with a paired percentile bootstrap over documents.

    per_model_docs[m][k]: model m's sums on document k (DocumentResult, LossTotals or a JSON row).
    One draw idx = default_rng(seed).integers(0, D, (n_resamples, D)) serves every model (the draw
    of lmloss.results.bootstrap_ci, so a model's interval equals its bits_per_byte interval there):
        bpb[m, r] = nll[m, idx[r]].sum() / (ln 2 * n_bytes[m, idx[r]].sum())
        delta ci  = quantiles (1 - level) / 2 and (1 + level) / 2 of bpb[b, :] - bpb[a, :]
    A resample holding only documents without bytes (for some model) is left out.
    """
    if len(per_model_docs) < 1:
        raise ValueError("paired_bootstrap needs the per-document sums of at least one model, got none")
    sums = [[_doc_sums(row) for row in docs] for docs in per_model_docs]
    n_docs = len(sums[0])
    for m, rows in enumerate(sums):
        if len(rows) != n_docs:
            raise ValueError(f"model {m} has {len(rows)} documents and model 0 has {n_docs}: a paired "
                             "comparison needs every model's sums on the same documents, in one order")
        for k, (row, first) in enumerate(zip(rows, sums[0])):
            if row[2] and first[2] and row[2] != first[2]:
                raise ValueError(f"document {k} of model {m} has text sha256 {row[2]}, model 0's has {first[2]}: "
                                 "the models scored different documents; pass the same corpus to each")
        if sum(r[1] for r in rows) <= 0:
            raise ValueError(f"model {m}'s documents hold no bytes: bits per byte is undefined")
    nll = np.array([[r[0] for r in rows] for rows in sums], dtype=np.float64)  # (M, D)
    n_bytes = np.array([[r[1] for r in rows] for rows in sums], dtype=np.float64)  # (M, D)
    pooled = nll.sum(axis=1) / (math.log(2) * n_bytes.sum(axis=1))  # (M,)
    resampled = None
    if n_docs >= 2 and n_resamples > 0:
        idx = np.random.default_rng(seed).integers(0, n_docs, size=(n_resamples, n_docs))
        denom = np.stack([n_bytes[m][idx].sum(axis=1) for m in range(len(sums))])  # (M, R)
        keep = (denom > 0).all(axis=0)
        num = np.stack([nll[m][idx].sum(axis=1) for m in range(len(sums))])
        resampled = num[:, keep] / (math.log(2) * denom[:, keep])  # (M, R kept)
    per_doc = np.divide(nll, math.log(2) * n_bytes, out=np.full_like(nll, np.nan), where=n_bytes > 0)
    pairs = []
    for a in range(len(sums)):
        for b in range(a + 1, len(sums)):
            both = (n_bytes[a] > 0) & (n_bytes[b] > 0)
            ci = _interval(resampled[b] - resampled[a], level) if resampled is not None else None
            pairs.append(PairDelta(a, b, float(pooled[b] - pooled[a]), ci,
                                   int((per_doc[b][both] < per_doc[a][both]).sum()), int(both.sum())))
    cis = [_interval(resampled[m], level) if resampled is not None else None for m in range(len(sums))]
    return PairedComparison([float(v) for v in pooled], cis, pairs, n_resamples, level, seed)


# -- KL divergence against a reference ---------------------------------------------------------------

@dataclass(frozen=True)
class KLDocument:
    """One document's KL sums (float64 over its scored positions) and both models' NLL sums."""

    index: int
    name: str
    n_positions: int
    kl_nats: float  # sum over positions of KL(P_ref || P)
    n_top1_same: int  # positions where both argmaxes agree
    delta_p: float  # sum of p(target) - p_ref(target)
    delta_p_sq: float  # sum of its squares
    reference: LossTotals
    model: LossTotals
    text_sha256: str

    def to_dict(self) -> dict:
        return dict(index=self.index, name=self.name, n_positions=self.n_positions, kl_nats=self.kl_nats,
                    n_top1_same=self.n_top1_same, delta_p=self.delta_p, delta_p_sq=self.delta_p_sq,
                    reference=self.reference.to_dict(), model=self.model.to_dict(), text_sha256=self.text_sha256)


@dataclass
class KLResult:
    """KL(P_ref || P) over every scored position: per-document sums, and the KL of each position
    (float32, documents in order, each document's positions in target order) for the percentiles."""

    per_document: list[KLDocument]
    position_kl_nats: np.ndarray
    config: dict
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def _sum(self, key: str):
        return sum(getattr(d, key) for d in self.per_document)

    @property
    def n_positions(self) -> int:
        return self._sum("n_positions")

    @property
    def sum_kl_nats(self) -> float:
        return float(self._sum("kl_nats"))

    @property
    def mean_kl_nats(self) -> float:
        return self.sum_kl_nats / self.n_positions

    @property
    def top1_agreement(self) -> float:
        return self._sum("n_top1_same") / self.n_positions

    @property
    def delta_p_mean(self) -> float:
        return self._sum("delta_p") / self.n_positions

    @property
    def delta_p_rms(self) -> float:
        return math.sqrt(self._sum("delta_p_sq") / self.n_positions)

    @property
    def reference_totals(self) -> LossTotals:
        return sum((d.reference for d in self.per_document), LossTotals())

    @property
    def model_totals(self) -> LossTotals:
        return sum((d.model for d in self.per_document), LossTotals())

    def documents(self, which: str) -> list[DocumentResult]:
        """Per-document sums of "reference" or "model" as DocumentResults (for bootstrap_ci and
        paired_bootstrap)."""
        if which not in ("reference", "model"):
            raise ValueError(f"which must be 'reference' or 'model', got {which!r}")
        return [DocumentResult(d.index, d.name, getattr(d, which), d.text_sha256) for d in self.per_document]

    def percentiles(self) -> dict:
        """{median_nats, p90_nats, p99_nats, p999_nats}: numpy's default ("linear") percentiles of
        the per-position KL values."""
        values = np.percentile(self.position_kl_nats.astype(np.float64), list(PERCENTILES.values()))
        return {k: float(v) for k, v in zip(PERCENTILES, values)}

    def bootstrap_ci(self, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple | None:
        """Percentile bootstrap of the mean KL over documents: sum kl_nats / sum n_positions of
        documents drawn with replacement (the draw of lmloss.results.bootstrap_ci); None with < 2."""
        if len(self.per_document) < 2 or n_resamples < 1:
            return None
        kl = np.array([d.kl_nats for d in self.per_document], dtype=np.float64)
        n = np.array([d.n_positions for d in self.per_document], dtype=np.float64)
        idx = np.random.default_rng(seed).integers(0, len(kl), size=(n_resamples, len(kl)))
        denom = n[idx].sum(axis=1)
        return _interval(kl[idx].sum(axis=1)[denom > 0] / denom[denom > 0], level)

    def summary(self, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
        """The "kl" object of the results JSON: every statistic and the sums it is a ratio of."""
        ci = self.bootstrap_ci(n_resamples=n_resamples, level=level, seed=seed)
        return dict(mean_nats=self.mean_kl_nats, **self.percentiles(), top1_agreement=self.top1_agreement,
                    delta_p_mean=self.delta_p_mean, delta_p_rms=self.delta_p_rms, n_positions=self.n_positions,
                    ci=list(ci) if ci else None, sum_kl_nats=self.sum_kl_nats, n_top1_same=self._sum("n_top1_same"),
                    sum_delta_p=float(self._sum("delta_p")), sum_delta_p_sq=float(self._sum("delta_p_sq")))


def _loaded(model):
    from lmloss.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    param = next(model.parameters())
    return load_model(model, device=str(param.device), dtype=str(param.dtype).removeprefix("torch."))


def _scored_logits(model, ids, rows, cols, chunk_rows: int):
    """Logits (n, V) of the scored positions (rows[k], cols[k]) in order, chunk_rows rows at a time:
    from the last hidden states through the head, else (no separable head) views of the full logits."""
    if model.head is None:
        logits = model(ids)  # (B, T, V)
        for i in range(0, rows.shape[0], chunk_rows):
            yield logits[rows[i:i + chunk_rows], cols[i:i + chunk_rows]]
        return
    hidden = model.hidden_states(ids)[rows, cols]  # (M, d)
    for i in range(0, hidden.shape[0], chunk_rows):
        yield model.head.logits(hidden[i:i + chunk_rows])  # (<= chunk_rows, V)


def _batch_kl(reference, model, ids, rows, cols, targets, impl: str) -> list[torch.Tensor]:
    """[kl, nll_ref, nll, top1 same] (M,) on the CPU for the scored positions of one batch."""
    from lmloss.ops.kl import token_kl

    chunk_rows = max(1, LOGITS_BYTES // (4 * reference.vocab_size))
    parts = []
    chunks = zip(_scored_logits(reference, ids, rows, cols, chunk_rows),
                 _scored_logits(model, ids, rows, cols, chunk_rows))
    for k, (ref_logits, logits) in enumerate(chunks):
        t = token_kl(ref_logits, logits, targets[k * chunk_rows:(k + 1) * chunk_rows], impl=impl)
        parts.append((t.kl, t.nll_ref, t.nll, t.argmax_ref == t.argmax))
    if not parts:
        return [torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)]
    return [torch.cat(p).cpu() for p in zip(*parts)]


def _window_sums(kl, nll_ref, nll, same) -> tuple:
    """(kl, nll_ref, nll, n_top1_same, delta_p, delta_p^2) summed in float64 over one window's positions."""
    delta_p = torch.exp(-nll.double()) - torch.exp(-nll_ref.double())
    return (kl.double().sum().item(), nll_ref.double().clamp_min(0).sum().item(),
            nll.double().clamp_min(0).sum().item(), int(same.sum()), delta_p.sum().item(),
            (delta_p * delta_p).sum().item())


def kl_divergence(reference_model, model, tokenizer, documents: Sequence, *, plan: str = "lm-eval",
                  max_length: int | None = None, stride: int | None = None, prefix_id: int | None = None,
                  every_window: bool = False, score_from: int | None = None, max_chunks: int | None = None,
                  bos_in_tokens: bool = False, batch_size: int | None = None, impl: str = "auto",
                  progress: bool = True) -> KLResult:
    """KL(P_reference || P_model) at every scored position of lmloss.evaluate's windows, both models
    run on each batch in lockstep, and both models' NLL sums per document.

    Same window options as lmloss.evaluate; max_length defaults to the shorter context of the two.
    Both models (LoadedModel or transformers causal LMs) must be on one device and have output
    heads of the same size, and `tokenizer` must be both models' (lmloss.compare.tokenizer_difference
    checks two tokenizers). impl: lmloss.ops.kl.token_kl's. One process (no torchrun sharding).
    """
    from tqdm.auto import tqdm

    from lmloss import checkpoint as ckpt_io

    start = time.perf_counter()
    reference, model = _loaded(reference_model), _loaded(model)
    check_inputs(tokenizer, documents, bos_in_tokens=bos_in_tokens)
    _check_same_vocabulary(reference, model)
    contexts = [c for c in (reference.context_length, model.context_length) if c]
    max_length, prefix_id = resolve_window(min(contexts) if contexts else None, tokenizer, plan=plan,
                                           max_length=max_length, prefix_id=prefix_id, every_window=every_window)
    for m in (reference, model):
        check_tokenizer_fits(tokenizer, m.vocab_size, m.name)
    batch_size = min(default_batch_size(reference), default_batch_size(model)) if batch_size is None else batch_size
    prep = prepare(tokenizer, documents, vocab_size=reference.vocab_size, plan=plan, max_length=max_length,
                   stride=stride, prefix_id=prefix_id, every_window=every_window, score_from=score_from,
                   max_chunks=max_chunks, bos_in_tokens=bos_in_tokens)
    windows, counts = prep.windows, prep.counts
    per_window: list = [None] * len(windows)  # (kl tensor, sums)
    bar = tqdm(total=sum(w.n_scored for w in windows), unit="tok", unit_scale=True, disable=not progress,
               desc="KL", dynamic_ncols=True)
    with torch.inference_mode():
        for b in batches(windows, prep.tokens, batch_size=batch_size, device=reference.device):
            outputs = _batch_kl(reference, model, b.ids, b.rows, b.cols, b.targets, impl)
            for i, parts in zip(b.indices, zip(*(o.split(b.n_scored) for o in outputs))):
                sums = _window_sums(*parts)
                if not all(math.isfinite(s) for s in sums):
                    raise ValueError(f"non-finite KL or loss in document {windows[i].doc}, window {i}: check the "
                                     "models' logits (dtype overflow, NaN weights)")
                per_window[i] = (parts[0], sums)
            bar.update(sum(b.n_scored))
    bar.close()
    doc_windows = prep.doc_windows()
    results = []
    for k, d in enumerate(documents):
        s = [0.0, 0.0, 0.0, 0, 0.0, 0.0]
        for i in doc_windows[k]:  # plan order: a fixed summation order whatever the batch size
            s = [x + y for x, y in zip(s, per_window[i][1])]
        n = sum(windows[i].n_scored for i in doc_windows[k])
        results.append(KLDocument(k, getattr(d, "name", ""), n, s[0], s[3], s[4], s[5],
                                  LossTotals(s[1], n, *counts[k]), LossTotals(s[2], n, *counts[k]),
                                  ckpt_io.text_sha256(d.text)))
    kl = [per_window[i][0] for k in range(len(documents)) for i in doc_windows[k]]
    position_kl = torch.cat(kl).numpy() if kl else np.zeros(0, dtype=np.float32)
    if position_kl.size == 0:
        raise ValueError(f"no token to score: the {len(documents)} documents hold no scored token under plan "
                         f"{plan!r} (max_length {max_length}); pass a corpus with text")
    config = dict(reference=reference.name, model=model.name, tokenizer=getattr(tokenizer, "name", None), plan=plan,
                  max_length=max_length, stride=stride, prefix_id=prefix_id, every_window=every_window,
                  score_from=score_from, max_chunks=max_chunks, bos_in_tokens=bos_in_tokens,
                  batch_size=batch_size, device=str(reference.device),
                  dtype=[str(m.dtype).removeprefix("torch.") for m in (reference, model)],
                  n_documents=len(documents), n_windows=len(windows), impl=impl)
    notes = [f"reference: {n}" for n in reference.notes] + [f"model: {n}" for n in model.notes]
    return KLResult(results, position_kl, config, notes, time.perf_counter() - start)


# -- paired comparison of any models -----------------------------------------------------------------

@dataclass
class Comparison:
    """Each model's lmloss.evaluate result on the same documents (in the given order), the paired
    bootstrap of their bits per byte, and whether all tokenizers give the same ids (only then are
    token perplexities comparable)."""

    names: list[str]
    results: list[EvalResult]
    paired: PairedComparison
    same_tokenizer: bool
    notes: list[str] = field(default_factory=list)


def _release_memory(device: torch.device) -> None:
    """After compare() dropped the last reference to a model it loaded: free its weights before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(models: Sequence, documents: Sequence, *, tokenizers: Sequence | None = None, device: str = "auto",
            dtype: str = "float32", plan: str = "lm-eval", max_length: int | None = None, stride: int | None = None,
            prefix_id: int | None = None, every_window: bool = False, score_from: int | None = None,
            max_chunks: int | None = None, bos_in_tokens: bool = False, batch_size: int | None = None,
            head_impl: str = "fused", per_model: Sequence[dict] | None = None, n_resamples: int = 1000,
            seed: int = 0, level: float = 0.95, progress: bool = True, cache: bool = True) -> Comparison:
    """lmloss.evaluate of every model on `documents`, each with its own tokenizer, then
    paired_bootstrap over the per-document sums.

    models: specs (hub name, folder, .gguf; loaded on `device` in `dtype` one at a time and freed
    before the next; cache: load_model's, for .gguf specs) or loaded models (used as given). tokenizers: one per model (specs or
    Tokenizers); default each spec's own. The window options are lmloss.evaluate's, for every model
    (max_length: default each model's own context); per_model[k], a dict of evaluate() keywords,
    overrides them for model k (e.g. bos_in_tokens where the tokenizers' conventions differ). The
    same spec with the same tokenizer and options given twice is evaluated once.
    """
    from lmloss.evaluate import evaluate
    from lmloss.models import load_model
    from lmloss.tokenizers import load_tokenizer

    if len(models) < 2:
        raise ValueError(f"a comparison needs at least 2 models, got {len(models)}")
    if tokenizers is None:
        loose = [type(m).__name__ for m in models if not isinstance(m, (str, os.PathLike))]
        if loose:
            raise ValueError(f"models given as objects ({', '.join(loose)}) have no spec to load a tokenizer "
                             "from: pass tokenizers=[...], one per model")
        tokenizers = list(models)
    if len(tokenizers) != len(models):
        raise ValueError(f"{len(models)} models but {len(tokenizers)} tokenizers: pass one tokenizer per model")
    toks = [load_tokenizer(t) if isinstance(t, (str, os.PathLike)) else t for t in tokenizers]
    names = [str(m) if isinstance(m, (str, os.PathLike)) else getattr(m, "name", type(m).__name__) for m in models]
    shared = dict(plan=plan, max_length=max_length, stride=stride, prefix_id=prefix_id, every_window=every_window,
                  score_from=score_from, max_chunks=max_chunks, bos_in_tokens=bos_in_tokens, batch_size=batch_size,
                  head_impl=head_impl, progress=progress)
    per_model = [{}] * len(models) if per_model is None else list(per_model)
    if len(per_model) != len(models):
        raise ValueError(f"{len(models)} models but {len(per_model)} per_model option dicts: pass one per model")
    results: list[EvalResult] = []
    notes = []
    done: dict = {}  # (spec, tokenizer id) -> index of the result
    for k, (spec, tok) in enumerate(zip(models, toks)):
        options = {**shared, **per_model[k]}
        key = (os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else id(spec), id(tok), repr(options))
        if key in done:
            notes.append(f"model {k} ({names[k]}) is model {done[key]} again: evaluated once, its pair compares "
                         "it with itself (delta 0)")
            results.append(results[done[key]])
            continue
        done[key] = k
        if isinstance(spec, (str, os.PathLike)):
            model = load_model(spec, device=device, dtype=dtype, cache=cache)
            where = model.device
            try:
                results.append(evaluate(model, tok, documents, **options))
            finally:
                del model
                _release_memory(where)
        else:
            results.append(evaluate(spec, tok, documents, **options))
    paired = paired_bootstrap([r.per_document for r in results], n_resamples=n_resamples, seed=seed, level=level)
    same = all(not tokenizer_difference(toks[0], t) for t in toks[1:])
    if not same:
        notes.append("the tokenizers differ: token perplexities are not comparable, bits per byte are")
    return Comparison(names, results, paired, same, notes)
