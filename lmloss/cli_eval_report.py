"""What `lmloss eval` prints and writes: the table of metrics with the sums behind each, llama.cpp's and
the GPTQ loop's numbers for plan "chunks", the per-corpus and pooled rows, the results JSON document, the
per-token NLL file and the plots. Pure formatting of an EvalResult: nothing here evaluates.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import lmloss
from lmloss import malloc

__all__ = ["format_table", "save_plot", "save_corpora_plot", "results_json", "format_token_stats",
           "chunk_numbers", "report", "pooled_json", "corpora_table", "save_token_nll"]

def format_table(result, ci: dict) -> str:
    t = result.totals
    rows = [("token_perplexity", f"exp(nll_nats / n_tokens) = exp({t.nll_nats:.4f} / {t.n_tokens})"),
            ("byte_perplexity", f"exp(nll_nats / n_bytes)  = exp({t.nll_nats:.4f} / {t.n_bytes})"),
            ("word_perplexity", f"exp(nll_nats / n_words)  = exp({t.nll_nats:.4f} / {t.n_words})"),
            ("bits_per_byte", f"nll_nats / (ln 2 * n_bytes) = {t.nll_nats:.4f} / (ln 2 * {t.n_bytes})"),
            ("bits_per_char", f"nll_nats / (ln 2 * n_chars) = {t.nll_nats:.4f} / (ln 2 * {t.n_chars})")]
    metrics = result.metrics()
    lines = [f"{'metric':17s} {'value':>12s}  {'95% CI (bootstrap over documents)':34s} from the sums"]
    for name, how in rows:
        value = f"{metrics[name]:12.6f}" if name in metrics else f"{'n/a':>12s}"
        lo_hi = f"[{ci[name][0]:.6f}, {ci[name][1]:.6f}]" if name in ci else "n/a"
        lines.append(f"{name:17s} {value}  {lo_hi:34s} {how}")
    return "\n".join(lines)


def save_plot(path: str | Path, result) -> None:
    """Mean NLL by input position of the prediction, and bits per byte of each document, drawn into
    the file `path` (its suffix picks the format; lmloss eval passes write_all's temporary file)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    pos = [(i, s / c) for i, (s, c) in enumerate(zip(result.position_nll_nats, result.position_count)) if c]
    ax1.plot([p for p, _ in pos], [v for _, v in pos], lw=0.8)
    ax1.set(xlabel="input position of the prediction in the window (0: predicted from one input)",
            ylabel="mean NLL (nats)",
            title="loss by context length")
    docs = [d for d in result.per_document if d.totals.n_bytes and d.totals.n_tokens]
    ax2.bar([d.index for d in docs], [d.totals.bits_per_byte for d in docs])
    ax2.axhline(result.totals.bits_per_byte, color="k", lw=0.8, ls="--", label="all documents")
    ax2.set(xlabel="document", ylabel="bits per byte", title="bits per byte by document")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.legend(loc="lower right")
    fig.suptitle(f"{result.config['model']} - {result.config.get('dataset', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=Path(path).suffix[1:].lower())
    plt.close(fig)


def save_corpora_plot(path: str | Path, results, cis: list[dict]) -> None:
    """Bits per byte of each corpus with its bootstrap interval, and the pooled value, drawn into the
    file `path` (as save_plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.config["dataset"] for r in results]
    bpb = [r.totals.bits_per_byte for r in results]
    err = [[b - ci["bits_per_byte"][0] for b, ci in zip(bpb, cis)],
           [ci["bits_per_byte"][1] - b for b, ci in zip(bpb, cis)]] if all("bits_per_byte" in c for c in cis) else None
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(names), 4))
    ax.bar(range(len(names)), bpb, yerr=err, capsize=4)
    pooled = sum((r.totals for r in results), lmloss.LossTotals()).bits_per_byte
    ax.axhline(pooled, color="k", lw=0.8, ls="--", label=f"pooled {pooled:.4f}")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="bits per byte", title=f"{results[0].config['model']}: bits per byte by corpus (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=Path(path).suffix[1:].lower())
    plt.close(fig)


def results_json(args, result, ci: dict) -> dict:
    """The --output document: configuration, versions, the sums, the metrics, intervals, rows."""
    import torch
    import transformers

    return dict(config=dict(vars(args), resolved=result.config),
                versions=dict(lmloss=lmloss.__version__, torch=torch.__version__,
                              transformers=transformers.__version__, python=platform.python_version()),
                runtime=dict(threads=torch.get_num_threads(), malloc=malloc.mode()),
                totals=result.totals.to_dict(), metrics=result.metrics(),
                confidence_intervals={k: list(v) for k, v in ci.items()},
                elapsed_s=result.elapsed_s, prepare_s=result.prepare_s, tokens_per_s=result.tokens_per_s,
                notes=result.notes,
                **({"chunks": chunk_numbers(result)} if chunk_numbers(result) else {}),
                **({"token_stats": result.token_stats} if result.token_stats is not None else {}),
                documents=[d.to_dict() for d in result.per_document])


def format_token_stats(st: dict) -> str:
    """Mean entropy, top-1 accuracy and the rank distribution, each with the sums it comes from."""
    n = st["n_tokens"]
    ranks = ", ".join(f"{k}: {v} ({100 * v / n:.1f}%)" for k, v in st["rank_counts"].items()) if n else "-"
    return (f"token statistics over {n} tokens scored in this run:\n"
            f"  mean entropy  {st['mean_entropy_nats']:.6f} nats = entropy_nats / n_tokens = "
            f"{st['entropy_nats']:.4f} / {n}\n"
            f"  top-1 accuracy {st['top1_accuracy']:.6f} = top1 / n_tokens = {st['top1']} / {n}\n"
            f"  target rank (logits strictly above the target's): {ranks}")


def chunk_numbers(result) -> dict:
    """Plan "chunks": what llama-perplexity and the GPTQ loop print, from the per-chunk sums.

    running_ppl[k] = exp(sum of the first k+1 chunks' nll / their tokens), llama.cpp's "[k]" values
    (its last is its "Final estimate: PPL", = token_perplexity); ppl_uncertainty its "+/-": PPL *
    sqrt((mean(v^2) - mean(v)^2) / (N - 1)) over the N scored token NLLs v (tokens taken as independent). gptq_ppl = exp(sum_i(loss_i * L) /
    (n * L)), loss_i = chunk i's mean NLL, computed in float32 as GPTQ's code does; every chunk scores
    the same L - 1 - score_from tokens, so it equals token_perplexity up to that rounding. {} for other
    plans and for sharded runs (a process holds only its chunks)."""
    import numpy as np

    cfg = result.config
    if cfg["plan"] != "chunks" or cfg["world_size"] > 1 or not result.windows:
        return {}
    nll = np.array(result.window_nll_nats, dtype=np.float64)
    n = np.array([w.n_scored for w in result.windows], dtype=np.float64)
    L = cfg["max_length"]
    loss = (nll / n).astype(np.float32)
    gptq = float(np.exp((loss * np.float32(L)).sum(dtype=np.float32) / np.float32(len(loss) * L)))
    N = n.sum()
    mean, mean_sq = nll.sum() / N, float(np.sum(result.window_nll_sq)) / N
    ppl = float(np.exp(mean))
    spread = ppl * float(np.sqrt(max(mean_sq - mean * mean, 0.0) / (N - 1))) if N > 1 else math.nan
    return dict(n_chunks=len(nll), tokens_per_chunk=int(n[0]), chunk_nll_nats=nll.tolist(),
                running_ppl=np.exp(np.cumsum(nll) / np.cumsum(n)).tolist(), ppl_uncertainty=spread,
                nll_sq_nats=float(np.sum(result.window_nll_sq)), gptq_ppl=gptq)


def report(args, result, ci: dict) -> None:
    """The summary line, the notes and the table of metrics with the sums behind them."""
    print(f"\n{result.config['model']} on {result.config['dataset']} ({len(result.per_document)} documents, "
          f"plan {args.plan}, max_length {result.config['max_length']}): {result.totals.n_tokens} tokens "
          f"scored, {result.resumed_documents} documents restored from the checkpoint, {result.elapsed_s:.1f} s")
    for note in result.notes:
        print(f"note: {note}")
    print(format_table(result, ci))
    if result.token_stats is not None:
        print(format_token_stats(result.token_stats))
    chunks = chunk_numbers(result)
    if chunks:
        shown = chunks["running_ppl"][:50]
        print("llama-perplexity's running PPL by chunk: " + ",".join(f"[{k}]{v:.4f}" for k, v in enumerate(shown, 1))
              + (f",... ({chunks['n_chunks']} chunks)" if len(shown) < chunks["n_chunks"] else ""))
        print(f"llama-perplexity's Final estimate: PPL = {result.totals.token_perplexity:.4f} +/- "
              f"{chunks['ppl_uncertainty']:.5f} (PPL * sqrt((sum v^2 / N - (sum v / N)^2) / (N - 1)), sum v^2 = "
              f"{chunks['nll_sq_nats']:.4f}, N = {result.totals.n_tokens})")
        print(f"GPTQ loop's number: exp(sum_i(loss_i * {result.config['max_length']}) / ({chunks['n_chunks']} * "
              f"{result.config['max_length']})) = {chunks['gptq_ppl']:.6f} (float32, as its code sums), token-weighted "
              f"exp(nll_nats / n_tokens) = {result.totals.token_perplexity:.6f}: equal but for rounding, as every "
              f"chunk scores {chunks['tokens_per_chunk']} tokens")


def pooled_json(results) -> dict:
    """All corpora as one: the sums added, the metrics of the sums (never a mean of per-corpus
    perplexities)."""
    from lmloss.results import merge_token_stats

    totals = sum((r.totals for r in results), lmloss.LossTotals())
    out = dict(totals=totals.to_dict(), metrics=totals.metrics())
    if all(r.token_stats is not None for r in results):
        out["token_stats"] = merge_token_stats([r.token_stats for r in results])
    return out


def corpora_table(results, cis: list[dict]) -> str:
    """A row per corpus and a pooled row from the summed totals, with the sums each ratio is of."""
    head = (f"{'corpus':28s} {'documents':>9s} {'tokens':>10s} {'bytes':>11s} {'nll_nats':>14s} "
            f"{'token_ppl':>10s} {'bits/byte':>9s}  95% CI (bits/byte)")
    lines = [head]
    pooled = sum((r.totals for r in results), lmloss.LossTotals())
    rows = [(r.config["dataset"], len(r.per_document), r.totals, ci.get("bits_per_byte")) for r, ci in zip(results, cis)]
    rows.append(("pooled (summed totals)", sum(len(r.per_document) for r in results), pooled, None))
    for name, n_docs, t, ci in rows:
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        lines.append(f"{name[:28]:28s} {n_docs:9d} {t.n_tokens:10d} {t.n_bytes:11d} {t.nll_nats:14.4f} "
                     f"{t.token_perplexity:10.4f} {t.bits_per_byte:9.6f}  {interval}")
    lines.append("token_ppl = exp(nll_nats / tokens), bits/byte = nll_nats / (ln 2 * bytes); the pooled row "
                 "divides the summed nll_nats by the summed counts")
    return "\n".join(lines)


def save_token_nll(path: Path, results) -> None:
    """Every scored token's NLL (nats) per document as one .npz: doc_{i} (c{k}_doc_{i} for corpus k
    of several), and with --token-stats doc_{i}_entropy, doc_{i}_rank, doc_{i}_argmax."""
    import numpy as np

    if any(r.resumed_documents or r.config["world_size"] > 1 for r in results):
        print("note: --token-nll holds only the documents this process scored in this run")
    prefix = ["" if len(results) == 1 else f"c{k}_" for k in range(len(results))]
    arrays = {f"{prefix[k]}doc_{i}": t.numpy() for k, r in enumerate(results) for i, t in r.token_nll.items()}
    for k, r in enumerate(results):
        for i, cols in (r.token_columns or {}).items():
            arrays.update({f"{prefix[k]}doc_{i}_{name}": c.numpy() for name, c in cols.items()})
    with open(path, "wb") as f:  # a file object: np.savez(path) would add ".npz" to "r.NPZ"
        np.savez(f, **arrays)
