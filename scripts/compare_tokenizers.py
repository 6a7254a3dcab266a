"""Compare tokenizers on corpora: tokens, bytes/token, chars/token, tokens/word, vocabulary used.

Examples (offline, from the project root):
    export TIKTOKEN_CACHE_DIR=../shared/assets/tokenizers/tiktoken_cache LMLOSS_DATA_DIR=../shared/assets/corpora
    python scripts/compare_tokenizers.py --tokenizers gpt2,cl100k_base,o200k_base \\
        --dataset wikitext,lambada --json compare.json --plot compare.png
    python scripts/compare_tokenizers.py --tokenizers gpt2,../shared/assets/tokenizers/hf-gpt2 \\
        --dataset wikitext:stream                      # name:form picks a form (rows, stream, pages)
    python scripts/compare_tokenizers.py --tokenizers o200k_base --dataset notes.txt,data.jsonl
    # with models: token perplexity next to bits per byte (each model under its own tokenizer)
    python scripts/compare_tokenizers.py --model ../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dataset wikitext --limit 4

Only bits per byte compares models with different tokenizers: token perplexity is per token, and
the tokens are not the same units (see the bytes/token column).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import lmloss  # noqa: E402
from lmloss.data import FORMS, load_corpus  # noqa: E402
from lmloss.tokenizers import load_tokenizer  # noqa: E402

DEFAULT_TOKENIZERS = "gpt2,cl100k_base,o200k_base"
COLUMNS = (  # (key, header, format)
    ("tokenizer", "tokenizer", "{}"), ("corpus", "corpus", "{}"), ("vocab_size", "vocab", "{:,}"),
    ("n_tokens", "tokens", "{:,}"), ("n_bytes", "bytes", "{:,}"), ("bytes_per_token", "bytes/token", "{:.3f}"),
    ("chars_per_token", "chars/token", "{:.3f}"), ("tokens_per_word", "tokens/word", "{:.3f}"),
    ("vocab_used", "vocab used", "{:.1%}"), ("bytes_exact", "bytes exact", "{}"),
)
MODEL_COLUMNS = (("token_perplexity", "token ppl", "{:.3f}"), ("bits_per_byte", "bits/byte", "{:.4f}"))


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def load_dataset_spec(spec: str, *, data_dir: str | None, limit: int | None):
    """'wikitext', 'wikitext:stream' or a file path -> (label, documents)."""
    name, _, form = spec.rpartition(":")
    if not name or form not in FORMS:
        name, form = spec, None
    label = spec if form is None else f"{name}:{form}"
    return label, load_corpus(name, form=form, data_dir=data_dir, limit=limit)


def measure(tokenizer, corpus: str, documents) -> dict:
    """One row: token counts of `documents` under `tokenizer`, and whether their bytes add up."""
    lengths = tokenizer.byte_lengths()
    n_tokens = n_token_bytes = n_text_bytes = 0
    seen: set[int] = set()
    start = time.perf_counter()
    for doc in documents:
        ids = tokenizer.encode(doc.text)
        n_tokens += len(ids)
        n_token_bytes += sum(lengths[i] for i in ids)
        n_text_bytes += len(doc.text.encode("utf-8"))
        seen.update(ids)
    encode_s = time.perf_counter() - start
    n_bytes = sum(d.n_bytes for d in documents)
    n_chars = sum(d.n_chars for d in documents)
    n_words = sum(d.n_words for d in documents)
    return dict(
        tokenizer=tokenizer.name, corpus=corpus, n_documents=len(documents),
        vocab_size=tokenizer.vocab_size, n_tokens=n_tokens, n_bytes=n_bytes, n_chars=n_chars,
        n_words=n_words, bytes_per_token=n_bytes / n_tokens, chars_per_token=n_chars / n_tokens,
        tokens_per_word=n_tokens / n_words, vocab_used=len(seen) / tokenizer.vocab_size,
        bytes_exact=n_token_bytes == n_text_bytes, encode_s=round(encode_s, 3),
    )


def evaluate_row(model_spec: str, corpus: str, documents, args) -> dict:
    """Evaluate one model under its own tokenizer; the row carries both perplexities."""
    tokenizer = load_tokenizer(model_spec)
    model = lmloss.load_model(model_spec, device=args.device, dtype=args.dtype)
    try:
        result = lmloss.evaluate(model, tokenizer, documents, max_length=args.max_length, progress=False)
    except NotImplementedError:
        raise SystemExit("--model needs lmloss.evaluate, which is not implemented in this checkout") from None
    row = measure(tokenizer, corpus, documents)
    row.update(model=model_spec, token_perplexity=result.totals.token_perplexity,
               bits_per_byte=result.totals.bits_per_byte)
    return row


def markdown_table(rows: list[dict]) -> str:
    columns = COLUMNS + tuple(c for c in MODEL_COLUMNS if any(c[0] in r for r in rows))
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if k in ("tokenizer", "corpus") else "---:" for k, _, _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "" for k, _, f in columns) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({e})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    width = 0.8 / len(tokenizers)
    fig, ax = plt.subplots(figsize=(4.5 + 1.6 * len(corpora) * max(1, len(tokenizers) / 2), 4))
    for j, tok in enumerate(tokenizers):
        values = [next((r["bytes_per_token"] for r in rows if r["tokenizer"] == tok and r["corpus"] == c), 0)
                  for c in corpora]
        bars = ax.bar([i + (j - (len(tokenizers) - 1) / 2) * width for i in range(len(corpora))], values,
                      width, label=tok)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(corpora)), corpora)
    ax.set_ylabel("UTF-8 bytes per token")
    ax.set_title("Tokenizer compression (higher = fewer tokens for the same text)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizers", default=DEFAULT_TOKENIZERS,
                   help="comma list: tiktoken names, hub names, tokenizer folders or .gguf paths")
    p.add_argument("--dataset", default="wikitext,lambada",
                   help="comma list: corpus names (wikitext, lambada; name:form) or .txt/.jsonl/.parquet paths")
    p.add_argument("--data-dir", default=None, help="local corpus mirror (default $LMLOSS_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each corpus")
    p.add_argument("--model", default=None,
                   help="comma list of models (hub name, folder, .gguf): evaluate each under its own tokenizer")
    p.add_argument("--max-length", type=int, default=None, help="evaluation window (default: model context)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="write one JSON row per (tokenizer, corpus) here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of bytes/token here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    corpora = [load_dataset_spec(s, data_dir=args.data_dir, limit=args.limit) for s in split_list(args.dataset)]
    rows = []
    for spec in split_list(args.tokenizers):
        tok = load_tokenizer(spec)
        rows += [measure(tok, label, docs) for label, docs in corpora]
    for spec in split_list(args.model or ""):
        rows += [evaluate_row(spec, label, docs, args) for label, docs in corpora]
    elapsed_s = time.perf_counter() - start
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows in {elapsed_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
