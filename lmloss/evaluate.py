"""The evaluation loop: documents -> token windows -> batched forward passes -> exact float64 sums.

    result = evaluate(load_model("gpt2"), load_tokenizer("gpt2"), load_corpus("wikitext"))
    result.totals.bits_per_byte, result.per_document[0].totals.nll_nats
    result = evaluate(model, tok, docs, checkpoint="run.jsonl")   # resumes from run.jsonl if present

Windows of consecutive documents are sorted by length (longest first, ties in plan order) and
batched with right padding (lmloss.prepare). Under a causal mask a real token only attends to the
real tokens before it, so padding changes no scored logit, and pad positions are never scored;
results do not depend on the batch size beyond float rounding of the matrix products. Only the
scored positions go through the output head: the fused `linear_token_nll` where the model exposes
its head, else `token_nll` on logits of those rows. Per-window sums are taken in float64 and added
per document in one fixed order, so totals are deterministic.

Resume: with `checkpoint=`, every finished document is appended and fsynced there (lmloss.checkpoint);
a later call with the same settings and corpus restores those documents and scores the rest. The
batches are always those of the whole run, and a batch holding any unfinished document is computed
whole, so a resumed run's numbers are bit-identical to an uninterrupted one's on the same device,
dtype, batch size, thread count and number of processes.

Data parallel: under torchrun (an initialized default process group, or torchrun's environment)
the documents are dealt to ranks (lmloss.distributed.shard_documents), each rank scores its share,
and every rank returns the merged result: the per-document sums gathered and added in document
order, the same float64 additions as one process makes.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterator, Sequence

import torch

from lmloss import checkpoint as ckpt_io
from lmloss.metrics import LossTotals
from lmloss.ops import token_nll
from lmloss.ops.linear import linear_token_nll
from lmloss.ops.linear_stats import linear_token_stats
from lmloss.ops.stats import TokenStats, token_stats as logits_token_stats
from lmloss.prepare import Prepared, batches, check_inputs, prepare
from lmloss.results import DocumentResult, EvalResult, StatsSums, merge_token_stats
from lmloss.windows import Window

__all__ = ["evaluate", "score_windows", "check_tokenizer_fits", "default_batch_size", "resolve_window"]

_HEAD_ROWS = 2048  # rows of logits built at once on the logits path: 2048 x V floats


def default_batch_size(model) -> int:
    """Windows per forward pass when none is given: 2 on the CPU (SmolLM2, 1024-token windows, this
    project's 2-core machine: batch 1-2 ran 5-10% faster than 4 or 8); 32 on a GPU, 8 there for a
    model without a separable head, whose full (batch, T, V) logits must exist."""
    if model.device.type == "cpu":
        return 2
    return 32 if model.head is not None else 8


def _head_fused(hidden, head, targets, stats: bool = False):
    """lmloss.linear_token_nll (linear_token_stats): the loss straight from hidden states, never all
    logits at once."""
    fn = linear_token_stats if stats else linear_token_nll
    return fn(hidden, head.weight, targets, bias=head.bias, softcap=head.softcap)


def _head_logits(hidden, head, targets, stats: bool = False):
    """Logits of the scored rows only, _HEAD_ROWS at a time, then lmloss.token_nll (token_stats)."""
    fn = logits_token_stats if stats else token_nll
    return _cat([fn(head.logits(hidden[i:i + _HEAD_ROWS]), targets[i:i + _HEAD_ROWS])
                 for i in range(0, hidden.shape[0], _HEAD_ROWS)], hidden.device, stats)


def _cat(parts: list, device, stats: bool):
    """Concatenate per-part NLL tensors, or TokenStats column by column."""
    if not parts:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        long = torch.zeros(0, dtype=torch.long, device=device)
        return TokenStats(empty, empty, long, long) if stats else empty
    if stats:
        return TokenStats(*(torch.cat(c) for c in zip(*parts)))
    return torch.cat(parts)


HEAD_IMPLS = {"fused": _head_fused, "logits": _head_logits}


def _scored_nll(model, ids, rows, cols, targets, head_impl: str, stats: bool = False):
    """Per-token NLL (M,) float32 of the scored positions (rows[k], cols[k]) only; with stats, their
    TokenStats (nll, entropy, rank, argmax)."""
    if model.head is None:
        logits = model(ids)  # (B, T, V)
        fn = logits_token_stats if stats else token_nll
        # Each window's scored positions are one contiguous run of its row: score views of the
        # logits, never an indexed copy (8 GiB at Gemma's 262,144 classes x 8 x 1024).
        parts, k = [], 0
        for b, n in enumerate(torch.bincount(rows, minlength=ids.shape[0]).tolist()):
            if n:
                first = int(cols[k])
                parts.append(fn(logits[b, first:first + n], targets[k:k + n]))
                k += n
        return _cat(parts, logits.device, stats)
    hidden = model.hidden_states(ids)[rows, cols]  # (M, d)
    return HEAD_IMPLS[head_impl](hidden, model.head, targets, stats)


def score_windows(model, tokens: Sequence[Sequence[int]], windows: Sequence[Window], *,
                  batch_size: int = 8, head_impl: str = "fused", skip: frozenset[int] = frozenset(),
                  stats: bool = False) -> Iterator[tuple[list[int], list]]:
    """Yield (window indices, per-token NLL of each window's scored targets (float32, CPU)) per batch;
    with stats, each window's TokenStats (nll, entropy, rank, argmax; lmloss.token_stats) instead.

    The batches are lmloss.prepare.batches(windows, tokens, batch_size=batch_size, skip=skip): they
    depend only on `windows` and `batch_size`. `skip`: window indices whose results are not needed;
    a batch of skipped windows only is not computed, a batch holding any other window is computed
    whole, so every window gets the numbers it gets in a run without `skip`.
    """
    if head_impl not in HEAD_IMPLS:
        raise ValueError(f"unknown head_impl {head_impl!r}; expected one of {sorted(HEAD_IMPLS)}")
    with torch.inference_mode():
        for b in batches(windows, tokens, batch_size=batch_size, device=model.device, skip=skip):
            out = _scored_nll(model, b.ids, b.rows, b.cols, b.targets, head_impl, stats)
            if stats:
                cols = [c.cpu().split(b.n_scored) for c in (out.nll.float(), out.entropy.float(), out.rank, out.argmax)]
                yield b.indices, [TokenStats(*c) for c in zip(*cols)]
            else:
                yield b.indices, list(out.float().cpu().split(b.n_scored))


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


def resolve_window(context_length: int | None, tokenizer, *, plan: str, max_length: int | None,
                   prefix_id: int | None, every_window: bool) -> tuple[int, int | None]:
    """(max_length, prefix_id) as a run uses them: the model's context length unless given (never
    above it), and BOS (else EOS) as the prefix for "lm-eval" and every_window unless given
    ("chunks" takes a prefix only when given: the token written over each chunk's first)."""
    max_length = context_length if max_length is None else max_length
    if max_length is None:
        raise ValueError("the model's config states no context length: pass max_length")
    if context_length is not None and max_length > context_length:
        raise ValueError(f"max_length {max_length} is above the model's context length {context_length}; "
                         f"pass max_length <= {context_length}")
    if prefix_id is None and plan != "chunks" and (plan == "lm-eval" or every_window):
        prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return max_length, prefix_id


def evaluate(model, tokenizer, documents: Sequence, *, plan: str = "lm-eval",
             max_length: int | None = None, stride: int | None = None, prefix_id: int | None = None,
             every_window: bool = False, batch_size: int | None = None, head_impl: str = "fused",
             keep_token_nll: bool = False, progress: bool = True,
             on_document: Callable[[DocumentResult], None] | None = None,
             checkpoint: str | os.PathLike | None = None, score_from: int | None = None,
             max_chunks: int | None = None, bos_in_tokens: bool = False, token_stats: bool = False) -> EvalResult:
    """Score every token of every document once; float64 sums per document and overall.

    model: a LoadedModel (lmloss.load_model) or a transformers causal LM (wrapped on its device).
    tokenizer: lmloss Tokenizer (encode without specials, bos_id, eos_id). documents: Documents.
    plan, max_length (default: the model's context), stride, every_window, and for plan "chunks"
    score_from and max_chunks: see lmloss.windows.
    prefix_id: what the first token is predicted from; default BOS, else EOS, for "lm-eval" and
    every_window (for "sliding" the first token is then context only, as in the HF guide).
    batch_size: windows per forward pass (default: default_batch_size(model)).
    head_impl: "fused" or "logits" (see score_windows).
    bos_in_tokens: each document's token list starts with BOS, which is then scored like any token
    when a window predicts it (lm-evaluation-harness with add_bos_token, as for Gemma; llama.cpp
    and the GPTQ loop when the tokenizer adds BOS).
    Under plan "chunks" a document's counts are those of its scored text (bytes, chars; no words).
    token_stats: also the entropy of each predicted distribution and the target's rank
    (lmloss.token_stats; the NLL then comes from the same pass): EvalResult.token_stats holds their
    sums over the tokens scored in this call, token_columns the per-token columns with keep_token_nll.
    on_document(DocumentResult) is called as soon as a document's last window is scored.
    checkpoint: a .jsonl path (rank r > 0 writes path's ".rank{r}" sibling). Every finished
    document is appended and fsynced; calling again with the same settings and corpus restores
    them (EvalResult.resumed_documents) and scores the rest, bit-identically (module docstring);
    a checkpoint of other settings is refused, naming the keys that differ. The file is kept.
    Under torchrun the documents are sharded over ranks and every rank returns the merged result.
    ValueError for a run that would score no token, and for a tokenizer that does not fit the model.
    """
    from lmloss.distributed import shard_documents
    from lmloss.models import LoadedModel, load_model

    start = time.perf_counter()  # tokenizing counts, as it does in lm-eval's loglikelihood_rolling
    if not isinstance(model, LoadedModel):
        param = next(model.parameters())
        model = load_model(model, device=str(param.device), dtype=str(param.dtype).removeprefix("torch."))
    check_inputs(tokenizer, documents, bos_in_tokens=bos_in_tokens)
    max_length, prefix_id = resolve_window(model.context_length, tokenizer, plan=plan, max_length=max_length,
                                           prefix_id=prefix_id, every_window=every_window)
    batch_size = default_batch_size(model) if batch_size is None else batch_size
    check_tokenizer_fits(tokenizer, model.vocab_size, model.name)
    rank, world_size = _process_group(model.device)
    if max_chunks is not None and world_size > 1:
        raise ValueError(f"max_chunks={max_chunks} counts chunks over the whole corpus, which {world_size} "
                         "processes each holding a share cannot do: run it in one process")
    dtype = str(model.dtype).removeprefix("torch.")
    fp = ckpt_io.fingerprint(model.name, tokenizer, documents, plan=plan, max_length=max_length, stride=stride,
                     prefix_id=prefix_id, every_window=every_window, dtype=dtype, head_impl=head_impl,
                     score_from=score_from, max_chunks=max_chunks, bos_in_tokens=bos_in_tokens,
                     token_stats=token_stats)
    done = ({i: DocumentResult.from_dict(row) for i, row in ckpt_io.restore(checkpoint, fp, documents).items()}
            if checkpoint is not None else {})
    _barrier(world_size)  # every rank has read the checkpoint before any rank appends to it
    mine = shard_documents([len(d.text) for d in documents], rank, world_size)
    config = dict(model=model.name, tokenizer=getattr(tokenizer, "name", None), plan=plan,
                  max_length=max_length, stride=stride, prefix_id=prefix_id, every_window=every_window,
                  batch_size=batch_size, head_impl=head_impl, device=str(model.device), dtype=dtype,
                  n_documents=len(documents), world_size=world_size, corpus_sha256=fp["corpus_sha256"],
                  score_from=score_from, max_chunks=max_chunks, bos_in_tokens=bos_in_tokens,
                  token_stats=token_stats)
    writer = ckpt_io.Checkpoint(ckpt_io.rank_path(checkpoint, rank), fp, keep=True) if checkpoint else None
    try:
        def finished(doc: DocumentResult) -> None:
            if writer is not None:
                writer.append(doc.to_dict())
            if on_document is not None:
                on_document(doc)

        result = _score(model, tokenizer, documents, mine, done, config, start, batch_size=batch_size,
                        head_impl=head_impl, keep_token_nll=keep_token_nll, progress=progress and rank == 0,
                        on_document=finished)
    finally:
        if writer is not None:
            writer.close()
    if world_size > 1:
        _merge_ranks(result)
    if result.totals.n_tokens == 0:
        why = ("; plan 'chunks' scores whole chunks only, so a document needs at least max_length tokens: pass a "
               "smaller max_length or a longer text" if plan == "chunks" else "; pass a corpus with text")
        raise ValueError(f"no token to score: the {len(documents)} documents hold no scored token under "
                         f"plan {plan!r} (max_length {max_length}){why}")
    return result


def _process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size): of the default process group, joined from torchrun's environment if not
    yet initialized; (0, 1) without torchrun."""
    import torch.distributed as dist

    from lmloss.distributed import init_from_env

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        ctx = init_from_env(str(device))
        return ctx.rank, ctx.world_size
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _merge_ranks(result: EvalResult) -> None:
    """Every rank's per-document results and position sums, on every rank: the totals are the sum
    in document order, the same float64 additions as one process makes."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (result.per_document, result.elapsed_s, result.position_nll_nats,
                                   result.position_count, result.resumed_documents, result.token_stats))
    by_index = {d.index: d for p in parts for d in p[0]}
    result.per_document = [by_index[i] for i in sorted(by_index)]
    result.totals = sum((d.totals for d in result.per_document), LossTotals())
    result.elapsed_s = max(p[1] for p in parts)
    result.position_nll_nats = [sum(v) for v in zip(*(p[2] for p in parts))]
    result.position_count = [sum(v) for v in zip(*(p[3] for p in parts))]
    result.resumed_documents = sum(p[4] for p in parts)
    if result.token_stats is not None:
        result.token_stats = merge_token_stats([p[5] for p in parts])


def _score(model, tokenizer, documents, mine, done, config, start, *, batch_size, head_impl, keep_token_nll,
           progress, on_document) -> EvalResult:
    """Score documents[i] for i in mine (restoring those in done) and return this process's result."""
    mine_docs = [documents[i] for i in mine]
    t0 = time.perf_counter()
    prep = prepare(tokenizer, mine_docs, vocab_size=model.vocab_size, plan=config["plan"],
                   max_length=config["max_length"], stride=config["stride"], prefix_id=config["prefix_id"],
                   every_window=config["every_window"], score_from=config["score_from"],
                   max_chunks=config["max_chunks"], bos_in_tokens=config["bos_in_tokens"], doc_ids=mine)
    prepare_s = time.perf_counter() - t0
    config["n_windows"] = len(prep.windows)
    result = _run(model, mine_docs, prep, config, start, batch_size=batch_size, head_impl=head_impl,
                  keep_token_nll=keep_token_nll, progress=progress, on_document=on_document, doc_ids=mine,
                  done={k: done[i] for k, i in enumerate(mine) if i in done})
    result.prepare_s = prepare_s
    return result


def _run(model, documents, prep: Prepared, config, start, *, batch_size, head_impl, keep_token_nll, progress,
         on_document, doc_ids, done) -> EvalResult:
    """The loop proper: score batches, fold per-window sums into per-document float64 sums.
    prep: the documents' tokens, windows and counts; done: {position in documents: DocumentResult}
    of documents restored, not scored."""
    from tqdm.auto import tqdm

    tokens, windows, counts = prep.tokens, prep.windows, prep.counts
    n_docs = len(documents)
    doc_windows = prep.doc_windows()
    for k, doc in done.items():
        n_scored = sum(windows[i].n_scored for i in doc_windows[k])
        t = doc.totals
        if (t.n_tokens, t.n_bytes, t.n_words, t.n_chars) != (n_scored, *counts[k]):
            raise ValueError(f"checkpoint row for document {doc_ids[k]} says {t.n_tokens} tokens, {t.n_bytes} "
                             f"bytes, {t.n_words} words, {t.n_chars} chars; this run scores {n_scored} tokens, "
                             f"{counts[k]} (bytes, words, chars) for it: the checkpoint does not belong to "
                             "this corpus and plan; delete it to start over")
    skip = frozenset(i for k in done for i in doc_windows[k])
    stats = StatsSums() if config["token_stats"] else None
    columns: list = [None] * len(windows)
    pending = [len(mine) for mine in doc_windows]  # windows left per document
    window_nll = [0.0] * len(windows)
    window_sq = [0.0] * len(windows)
    per_token: list = [None] * len(windows)
    pos_sum = torch.zeros(config["max_length"], dtype=torch.float64)  # by input position
    pos_count = torch.zeros(config["max_length"], dtype=torch.int64)
    results: list[DocumentResult | None] = [done.get(k) for k in range(n_docs)]
    notes = list(model.notes)
    if config["plan"] == "chunks":
        notes.append(f"plan 'chunks': {len(windows)} disjoint chunks of {config['max_length']} tokens, the first "
                     f"{config['score_from'] or 0} predictions of each context only"
                     + (f", token {config['prefix_id']} written over each chunk's first token"
                        if config["prefix_id"] is not None else "")
                     + "; the tokens after a document's last whole chunk are not scored. Bytes and characters "
                     "are those of the scored tokens' text; words are not counted")
    if config["bos_in_tokens"]:
        notes.append(f"each document's token list starts with BOS (id {next((t[0] for t in tokens if len(t)), '-')}), which is "
                     "scored where a window predicts it")
    if done and config["token_stats"]:
        notes.append("token statistics cover the tokens scored in this call, not the restored documents")
    if done:
        notes.append(f"{len(done)} documents restored from a checkpoint: their sums are in the totals, "
                     "their tokens are not in the per-position sums or the per-token NLL")
    progress_done = [0, 0]  # documents, bytes finished in this call
    bar = tqdm(total=sum(w.n_scored for i, w in enumerate(windows) if i not in skip), unit="tok",
               unit_scale=True, disable=not progress, desc="scoring", dynamic_ncols=True)

    def finish(doc: int) -> None:
        mine = doc_windows[doc]
        nll = 0.0
        for i in mine:  # plan order: a fixed summation order whatever the batch size
            nll += window_nll[i]
        d = documents[doc]
        totals = LossTotals(nll, sum(windows[i].n_scored for i in mine), *counts[doc])
        results[doc] = DocumentResult(doc_ids[doc], getattr(d, "name", ""), totals, ckpt_io.text_sha256(d.text))
        progress_done[0] += 1
        progress_done[1] += d.n_bytes
        bar.set_postfix_str(f"{progress_done[0]}/{n_docs - len(done)} documents, {progress_done[1]:,} bytes",
                            refresh=False)
        on_document(results[doc])

    for doc in range(n_docs):
        if pending[doc] == 0 and doc not in done:  # an empty document: nothing to score, still a row
            finish(doc)
    for idx, outs in score_windows(model, tokens, windows, batch_size=batch_size, head_impl=head_impl,
                                   skip=skip, stats=stats is not None):
        for i, out in zip(idx, outs):
            if i in skip:
                continue
            nll = out.nll if stats is not None else out
            if stats is not None:
                stats.add(out)
                if keep_token_nll:
                    columns[i] = out
            w = windows[i]
            nll64 = nll.double()
            window_nll[i] = nll64.sum().item()
            window_sq[i] = nll64.square().sum().item()
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
    totals = sum((d.totals for d in results), LossTotals())
    token_nll = None
    if keep_token_nll:
        token_nll = {doc_ids[d]: torch.cat([per_token[i] for i in doc_windows[d]]) if doc_windows[d]
                     else torch.zeros(0) for d in range(n_docs) if d not in done}
    token_columns = None
    if keep_token_nll and stats is not None:
        token_columns = {doc_ids[d]: {name: torch.cat([getattr(columns[i], name) for i in doc_windows[d]])
                                      for name in ("entropy", "rank", "argmax")}
                         for d in range(n_docs) if d not in done and doc_windows[d]}
    return EvalResult(totals, results, config, list(windows), window_nll, pos_sum.tolist(), pos_count.tolist(),
                      token_nll, elapsed, notes, resumed_documents=len(done),
                      token_stats=stats.to_dict() if stats is not None else None, token_columns=token_columns,
                      window_nll_sq=window_sq)
