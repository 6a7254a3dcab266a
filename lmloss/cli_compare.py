"""`lmloss compare-tokenizers` (also `python scripts/compare_tokenizers.py`, `python -m lmloss
compare-tokenizers`): compare tokenizers on corpora: tokens, bytes/token, chars/token, tokens/word,
vocabulary used.

Examples (offline, from the project root):
    export TIKTOKEN_CACHE_DIR=../shared/assets/tokenizers/tiktoken_cache LMLOSS_DATA_DIR=../shared/assets/corpora
    lmloss compare-tokenizers --tokenizers gpt2,cl100k_base,o200k_base \\
        --dataset wikitext,lambada --json compare.json --plot compare.png
    lmloss compare-tokenizers --tokenizers gpt2,../shared/assets/tokenizers/hf-gpt2 \\
        --dataset wikitext:stream                      # name:form picks a form (rows, stream, pages)
    lmloss compare-tokenizers --tokenizers o200k_base --dataset notes.txt,data.jsonl
    lmloss compare-tokenizers --tokenizers gpt2 --dataset posts.jsonl --text-field body
    # any Hugging Face dataset, hf:PATH[:CONFIG[:SPLIT[:FIELD]]], streamed: the first 10 MB of C4 validation
    lmloss compare-tokenizers --dataset hf:allenai/c4:en:validation:text --max-bytes 10000000
    lmloss compare-tokenizers --dataset hf:/data/my_dataset::test:content   # a local folder
    lmloss compare-tokenizers --dataset pile --subset ArXiv --limit 100  # names: lmloss/corpora.py
    # with models: token perplexity next to bits per byte (each model under its own tokenizer)
    lmloss compare-tokenizers --model ../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dataset wikitext --limit 4

Only bits per byte compares models with different tokenizers: token perplexity is per token, and
the tokens are not the same units (see the bytes/token column). A bad input ends in one line
"error: ..." and exit code 2 (--debug shows the traceback); --json and --plot are checked before any
work, and --json is replaced all at once, never left half-written.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import lmloss
from lmloss import data
from lmloss.data import FORMS, load_corpus
from lmloss.models import DTYPES, resolve_device
from lmloss.outputs import check_output_path, write_all
from lmloss.encode import encode_document
from lmloss.tokenizers import load_tokenizer

DEFAULT_TOKENIZERS = "gpt2,cl100k_base,o200k_base"
COLUMNS = (  # (key, header, format)
    ("tokenizer", "tokenizer", "{}"), ("corpus", "corpus", "{}"), ("vocab_size", "vocab", "{:,}"),
    ("n_tokens", "tokens", "{:,}"), ("n_bytes", "bytes", "{:,}"), ("bytes_per_token", "bytes/token", "{:.3f}"),
    ("chars_per_token", "chars/token", "{:.3f}"), ("tokens_per_word", "tokens/word", "{:.3f}"),
    ("vocab_used", "vocab used", "{:.1%}"), ("bytes_exact", "bytes exact", "{}"),
)
MODEL_COLUMNS = (("token_perplexity", "token ppl", "{:.3f}"), ("bits_per_byte", "bits/byte", "{:.4f}"))
DATASET_HELP = ("comma list: corpus names (wikitext, lambada, ptb, c4, pile, ...; name:form), hf:PATH[:CONFIG[:SPLIT"
                "[:FIELD]]] specs or .txt/.jsonl/.parquet paths")


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def split_spec(spec: str) -> tuple[str, str | None]:
    """'wikitext:stream' -> ('wikitext', 'stream'); 'wikitext', a path or an hf: spec -> (spec, None).
    An hf: spec is never split: its colons separate PATH, CONFIG, SPLIT and FIELD."""
    if spec.startswith("hf:"):
        return spec, None
    name, _, form = spec.rpartition(":")
    if not name or form not in FORMS:
        return spec, None
    return name, form


def takes_field(spec: str) -> bool:
    """Whether --text-field applies to this --dataset entry (lmloss.data.takes_field, name:form aside)."""
    return data.takes_field(split_spec(spec)[0])


def takes_subset(spec: str) -> bool:
    """Whether --subset applies to this --dataset entry (lmloss.data.takes_subset, name:form aside)."""
    return data.takes_subset(split_spec(spec)[0])


def load_dataset_spec(spec: str, *, data_dir: str | None, limit: int | None, field: str | None = None,
                      max_bytes: int | None = None, subset: str | None = None):
    """'wikitext', 'wikitext:stream', an hf: spec or a file path -> (label, documents)."""
    name, form = split_spec(spec)
    label = spec if form is None else f"{name}:{form}"
    return label, load_corpus(name, form=form, data_dir=data_dir, limit=limit, field=field, max_bytes=max_bytes,
                              subset=subset)


def measure(tokenizer, corpus: str, documents) -> dict:
    """One row: token counts of `documents` under `tokenizer`, and whether their bytes add up."""
    lengths = tokenizer.byte_lengths()
    n_tokens = n_token_bytes = n_text_bytes = 0
    seen: set[int] = set()
    start = time.perf_counter()
    for doc in documents:
        ids = encode_document(tokenizer, doc.text)  # array('i'): bounded memory on huge documents
        n_tokens += len(ids)
        n_token_bytes += sum(lengths[i] for i in ids)
        n_text_bytes += len(doc.text.encode("utf-8"))
        seen.update(ids)
    encode_s = time.perf_counter() - start
    if n_tokens == 0:  # the only zero divisor: n_words >= 1 per document (re.split gives >= 1 piece)
        if n_text_bytes == 0:
            raise ValueError(f"corpus {corpus!r} has no text ({len(documents)} documents, all empty); "
                             "pass a corpus with text")
        raise ValueError(
            f"tokenizer {tokenizer.name!r} encodes the {n_text_bytes:,} bytes of corpus {corpus!r} to no "
            "tokens: it is not a usable tokenizer for this text. A model folder without tokenizer files "
            "gives such a tokenizer; pass a folder with tokenizer.json, a .gguf file or a tiktoken name")
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


def evaluate_rows(model_spec: str, corpora, args) -> list[dict]:
    """One row per corpus for one model, under the model's own tokenizer; each row carries both
    perplexities. The tokenizer is measured first, so that one which cannot encode the text fails
    before the model loads; the model loads once for all corpora."""
    tokenizer = load_tokenizer(model_spec)
    rows = [measure(tokenizer, label, docs) for label, docs in corpora]
    model = lmloss.load_model(model_spec, device=args.device, dtype=args.dtype)
    for row, (_, docs) in zip(rows, corpora):
        result = lmloss.evaluate(model, tokenizer, docs, max_length=args.max_length, progress=False)
        row.update(model=model_spec, token_perplexity=result.totals.token_perplexity,
                   bits_per_byte=result.totals.bits_per_byte)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = COLUMNS + tuple(c for c in MODEL_COLUMNS if any(c[0] in r for r in rows))
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if k in ("tokenizer", "corpus") else "---:" for k, _, _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "" for k, _, f in columns) + " |")
    return "\n".join(lines)


# -- outputs: checked before any work, replaced all at once ------------------------------------------

def _import_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({e})") from None
    return matplotlib


def plot_png(rows: list[dict]) -> bytes:
    """A PNG bar chart of bytes/token: one group of bars per corpus, one bar per tokenizer."""
    matplotlib = _import_matplotlib()
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# -- command line -------------------------------------------------------------------------------------

def _positive_int(option: str, parser: argparse.ArgumentParser, value: int | None, what: str) -> None:
    if value is not None and value < 1:
        parser.error(f"{option} must be >= 1 ({what}), got {value}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmloss compare-tokenizers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizers", default=DEFAULT_TOKENIZERS,
                   help="comma list: tiktoken names, hub names, tokenizer folders or .gguf paths "
                        "(may be empty with --model)")
    p.add_argument("--dataset", default="wikitext,lambada", help=DATASET_HELP)
    p.add_argument("--text-field", default=None,
                   help="the text field of .jsonl/.parquet records (default: 'text', else 'page') or of hf: datasets "
                        "(default: 'text', else the only string column)")
    p.add_argument("--subset", default=None,
                   help="a part of the named corpora that have parts: pile (a set name) or paloma (a source)")
    p.add_argument("--data-dir", default=None, help="local corpus mirror (default $LMLOSS_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each corpus")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="first documents of each corpus up to and including the one that reaches N UTF-8 bytes")
    p.add_argument("--model", default=None,
                   help="comma list of models (hub name, folder, .gguf): evaluate each under its own tokenizer")
    p.add_argument("--max-length", type=int, default=None, help="evaluation window (default: model context)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (with --model)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--json", default=None, help="write one JSON row per (tokenizer, corpus) here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of bytes/token here (.png)")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    args = p.parse_args(argv)
    _positive_int("--limit", p, args.limit, "the first N documents of each corpus")
    _positive_int("--max-bytes", p, args.max_bytes, "the UTF-8 bytes read from each corpus")
    _positive_int("--max-length", p, args.max_length, "tokens per evaluation window")
    if not split_list(args.dataset):
        p.error(f"--dataset names no corpus (got {args.dataset!r}); expected a {DATASET_HELP}, e.g. "
                "--dataset wikitext,lambada")
    if args.model is not None and not split_list(args.model):
        p.error(f"--model names no model (got {args.model!r}); expected a comma list of hub names, "
                "folders or .gguf paths, or leave --model out to compare tokenizers only")
    if not split_list(args.tokenizers) and args.model is None:
        p.error(f"--tokenizers names no tokenizer (got {args.tokenizers!r}); expected a comma list of "
                f"tiktoken names, hub names, tokenizer folders or .gguf paths, e.g. --tokenizers "
                f"{DEFAULT_TOKENIZERS} (it may be empty only with --model)")
    return args


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before loading anything: output paths, matplotlib, device, --text-field."""
    if args.json:
        check_output_path("--json", args.json)
    if args.plot:
        check_output_path("--plot", args.plot, suffixes=(".png",))
        _import_matplotlib()
    if args.model:
        resolve_device(args.device)
    specs = split_list(args.dataset)
    data.check_corpus_options([split_spec(s)[0] for s in specs], field=args.text_field, subset=args.subset)


def run(args: argparse.Namespace) -> list[dict]:
    """The rows for `args` (from parse_args), printed as a table and written to --json / --plot."""
    check_args(args)
    start = time.perf_counter()
    corpora = [load_dataset_spec(s, data_dir=args.data_dir, limit=args.limit, max_bytes=args.max_bytes,
                                 field=args.text_field if takes_field(s) else None,  # each option goes only
                                 subset=args.subset if takes_subset(s) else None)  # where it means something
               for s in split_list(args.dataset)]
    rows = []
    for spec in split_list(args.tokenizers):
        tok = load_tokenizer(spec)
        rows += [measure(tok, label, docs) for label, docs in corpora]
    for spec in split_list(args.model or ""):
        rows += evaluate_rows(spec, corpora, args)
    elapsed_s = time.perf_counter() - start
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows in {elapsed_s:.1f} s")
    outputs = [(args.json, lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")),
               (args.plot, lambda tmp: tmp.write_bytes(plot_png(rows)))]
    write_all([(path, writer) for path, writer in outputs if path])  # a later failure says what was written
    return rows


def main(argv=None) -> int:
    """Exit code: 0 done, 2 a bad input, 1 an unexpected error (each one line on stderr; --debug
    shows the traceback), 130 interrupted."""
    from lmloss.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv), own_process=argv is None)
