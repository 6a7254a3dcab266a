"""`lmloss eval` (also `python scripts/eval.py`, `python -m lmloss eval`): evaluate a causal
language model on a corpus: token, byte and word perplexity, bits per byte.

    lmloss eval --model gpt2 --dataset wikitext                 # lm-eval's wikitext task
    lmloss eval --model gpt2 --preset hf-sliding                # the HF perplexity guide
    # offline, with the shared assets
    LMLOSS_DATA_DIR=../shared/assets/corpora lmloss eval \
        --model ../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \
        --preset lm-eval --max-length 1024 --output results.json --plot results.png

Presets are flat TOML files in configs/ (`--preset lm-eval` reads configs/lm-eval.toml, a path to a
.toml file works too); their keys are the long options below with "_" for "-", applied as defaults
so that the command line wins. Parse, check every input, load, call lmloss.evaluate, print, write:
the evaluation itself (resume, torchrun sharding, batching) is the library's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import lmloss
from lmloss import malloc
from lmloss.checkpoint import checkpoint_files, checkpoint_path, fingerprint, restore
from lmloss.data import check_corpus_options, takes_field, takes_subset
from lmloss.distributed import init_from_env
from lmloss.evaluate import bootstrap_ci, check_tokenizer_fits, resolve_window
from lmloss.models import peek_config, resolve_device
from lmloss.outputs import check_output_path, write_all
from lmloss.prepare import check_counts_scored_bytes
from lmloss.windows import PLANS

__all__ = ["build_parser", "parse_args", "run", "main"]

CONFIGS = Path(__file__).resolve().parent / "presets"  # links to the top-level configs/ (in a wheel: a copy)
ADD_BOS_RULES = ("no", "yes", "tokenizer", "lm-eval")


def score_from_arg(value: str) -> int | str:
    if value == "half":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'half', got {value!r}") from None


def bos_in_tokens(rule: str, tokenizer) -> tuple[bool, str]:
    """(does each document's token list start with BOS, why) under --add-bos `rule`.

    lm-eval: lm-evaluation-harness 0.4.13's HFLM with its default add_bos_token=None encodes each
    document with the tokenizer's own default (add_special_tokens=True), so the list starts with BOS
    exactly when the tokenizer adds one (Gemma, Llama: yes; GPT-2, SmolLM2: no); its add_bos_token=
    True/False is --add-bos yes/no. 0.4.13's HFLM special-cases no model family (older releases, and
    its sglang backend, forced BOS for "gemma" model types); it skips the BOS when the text itself
    starts with the BOS string, which lmloss does not follow. tokenizer: the same observed rule, as
    llama.cpp and the GPTQ loop apply it."""
    adds = bool(tokenizer.add_bos) and tokenizer.bos_id is not None
    if rule in ("lm-eval", "tokenizer"):
        who = ("lm-eval 0.4.13 rule (add_bos_token=None: the tokenizer's default)" if rule == "lm-eval"
               else "the tokenizer's own rule")
        return adds, f"{who}: the tokenizer {'adds' if adds else 'does not add'} BOS"
    if rule == "yes" and tokenizer.bos_id is None:
        raise ValueError(f"--add-bos yes, but tokenizer {tokenizer.name!r} has no BOS token; pass --add-bos no")
    return rule == "yes", f"--add-bos {rule}"


def add_window_options(a) -> None:
    """The options that choose the text and the windows, shared by lmloss eval and compare-models
    (`a` is a parser's add_argument); presets set their defaults."""
    a("--preset", help=f"configs/<name>.toml: {', '.join(sorted(f.stem for f in CONFIGS.glob('*.toml')))}")
    a("--plan", choices=PLANS, default="lm-eval", help="window plan (lmloss.windows)")
    a("--form", help="corpus form: pages, rows, stream or raw (default: the corpus's own)")
    a("--detokenize", action=argparse.BooleanOptionalAction, default=False,
      help="apply lm-evaluation-harness's WikiText detokenizer; counts stay on the original text")
    a("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR"),
      help="offline corpora folder (default: $LMLOSS_DATA_DIR)")
    a("--max-length", type=int, help="model inputs per window (default: the model's context length; "
      "compare-models KL mode: the shorter of the two)")
    a("--stride", type=int, help="sliding plan: how far windows move (default max_length // 2)")
    a("--bos-every-window", action=argparse.BooleanOptionalAction, default=False,
      help="put BOS (else EOS) at the start of every window; plan chunks: write BOS over each chunk's first "
           "token when the token list starts with BOS (llama.cpp)")
    a("--add-bos", choices=ADD_BOS_RULES, default="no",
      help="does each document's token list start with BOS (then scored like any token)? no; yes; tokenizer: "
           "when the tokenizer adds BOS (llama.cpp, the GPTQ loop, the HF guide); lm-eval: lm-evaluation-harness "
           "0.4.13's rule, the same (its add_bos_token=None; yes/no are its True/False)")
    a("--score-from", type=score_from_arg, help="plan chunks: predictions at the start of each chunk that are "
      "context only: N, or 'half' for max_length // 2 (llama.cpp's); default 0 (the GPTQ loop)")
    a("--chunks", type=int, help="plan chunks: score only the first K chunks (llama-perplexity --chunks K)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmloss eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=os.environ.get("LMLOSS_MODEL") or "gpt2",
      help="hub name, local folder or .gguf file (default: $LMLOSS_MODEL, else gpt2)")
    a("--dataset", default="wikitext",
      help="corpus name (wikitext, lambada, ptb, ...; see lmloss.corpora), hf:PATH[:CONFIG[:SPLIT[:FIELD]]], "
           "or a .txt/.jsonl/.parquet path; a comma list evaluates each with the model loaded once")
    a("--tokenizer", help="tokenizer spec (default: the model's)")
    add_window_options(a)
    a("--batch-size", type=int, help="windows per forward pass (default: 2 on the CPU, where small "
      "batches stay in cache and ran 5-10%% faster than 4 or 8; 32 on a GPU, 8 if the model's head "
      "is not separable)")
    a("--head-impl", choices=("fused", "logits"), default="fused",
      help="output head + loss: fused linear cross-entropy, or logits of the scored rows + token_nll")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a("--limit", type=int, help="score only the first N documents (of each corpus)")
    a("--max-bytes", type=int, help="score only the documents that hold the first B UTF-8 bytes (of each corpus)")
    a("--subset", help="a part of a corpus that has parts (pile: a pile_set_name; paloma: a domain)")
    a("--output", help="write results as JSON here (atomically)")
    a("--plot", help="PNG: mean NLL by position in the window, and bits per byte per document")
    a("--token-nll", help="write every scored token's NLL (nats) per document to this .npz file")
    a("--token-stats", action="store_true",
      help="also report the mean entropy of the predictions, top-1 accuracy and the target-rank distribution "
           "(one fused pass; --token-nll files gain entropy, rank and argmax columns)")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples over documents (0: none)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--resume", action="store_true",
      help="continue an interrupted run from the checkpoint next to --output (same settings)")
    a("--overwrite", action="store_true",
      help="discard the checkpoint of an earlier run next to --output and start over")
    a("--text-field", help="the text field of a .jsonl/.parquet corpus (default: text, else page)")
    a("--no-cache", action="store_true", help="convert a .gguf model and tokenizer again instead of using the "
      "converted copy under $LMLOSS_CACHE_DIR (default ~/.cache/lmloss), and store none")
    a("--debug", action="store_true", help="show the traceback of an error")
    return p


def apply_preset(parser: argparse.ArgumentParser, argv) -> None:
    """A --preset's keys become the parser's defaults (the command line wins)."""
    known, _ = parser.parse_known_args(argv)
    if not known.preset:
        return
    path = Path(known.preset) if known.preset.endswith(".toml") else CONFIGS / f"{known.preset}.toml"
    if not path.is_file():
        names = ", ".join(sorted(f.stem for f in CONFIGS.glob("*.toml")))
        parser.error(f"unknown preset {known.preset!r}: no {path}; presets: {names}")
    preset = tomllib.loads(path.read_text())
    unknown = sorted(set(preset) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f"preset {path} has unknown keys {unknown}; keys are option names with '_'")
    parser.set_defaults(**preset)


def parse_args(argv=None) -> argparse.Namespace:
    """argparse, with the preset's keys as defaults (the command line wins)."""
    parser = build_parser()
    apply_preset(parser, argv)
    args = parser.parse_args(argv)
    if args.stride is not None and (args.stride < 1 or (args.max_length and args.stride > args.max_length)):
        parser.error(f"--stride must be between 1 and --max-length ({args.max_length}), got {args.stride}")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be positive, got {args.max_length}")
    if args.stride is not None and args.plan != "sliding":
        parser.error(f"--stride is for --plan sliding; plan {args.plan!r} moves by --max-length")
    if args.plan != "chunks" and (args.score_from is not None or args.chunks is not None):
        parser.error(f"--score-from and --chunks are for --plan chunks, not {args.plan!r}")
    if args.chunks is not None and args.chunks < 1:
        parser.error(f"--chunks must be a positive number of chunks, got {args.chunks}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {args.bootstrap}")
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error(f"--max-bytes must be a positive number of bytes, got {args.max_bytes}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of documents, got {args.limit}")
    if args.resume and args.overwrite:
        parser.error("--resume continues the checkpoint and --overwrite discards it: pass one of them")
    if (args.resume or args.overwrite) and not args.output:
        parser.error(f"--{'resume' if args.resume else 'overwrite'} needs --output: the checkpoint "
                     "lives next to the results file")
    return args


def check_outputs(args) -> None:
    """Every output path, before the corpus, tokenizer or model is loaded."""
    for option, path, suffixes in (("--output", args.output, (".json",)), ("--token-nll", args.token_nll, (".npz",)),
                                   ("--plot", args.plot, (".png", ".pdf", ".svg"))):
        if path:
            check_output_path(option, path, suffixes=suffixes)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({e})") from None


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


def _device(args, dist_ctx) -> str:
    """--device, one GPU per rank under torchrun; ValueError if it is not on this machine."""
    import torch

    device = args.device
    if dist_ctx.enabled and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{dist_ctx.local_rank}"
    resolve_device(device)
    return device


def corpus_specs(dataset: str) -> list[str]:
    """--dataset as a list of corpus specs: "wikitext,ptb,hf:allenai/c4:en" -> three."""
    specs = [spec.strip() for spec in dataset.split(",") if spec.strip()]
    twice = sorted({spec for spec in specs if specs.count(spec) > 1})
    if twice:  # the pooled row would count the same documents twice
        raise ValueError(f"--dataset names {twice} more than once; name each corpus once")
    if not specs:
        raise ValueError(f"--dataset {dataset!r} names no corpus; pass a name, an hf: spec or a file path "
                         "(a comma list for several)")
    return specs


def _checkpoint_base(output: str, k: int) -> Path:
    """Corpus k's checkpoint: results.json.partial.jsonl for the first, ...partial.c{k}.jsonl after."""
    return checkpoint_path(output) if k == 0 else Path(f"{output}.partial.c{k}.jsonl")


def _preflight(args, dist_ctx):
    """Tokenizer, the model's configuration (not its weights), each corpus and its checkpoint, all
    checked before the weights are loaded: (tokenizer, [(spec, documents, checkpoint or None)])."""
    tokenizer = lmloss.load_tokenizer(args.tokenizer or args.model, cache=not args.no_cache)
    info = peek_config(args.model)
    if args.max_length and info.context_length and args.max_length > info.context_length:
        raise ValueError(f"--max-length {args.max_length} is above the context length of {args.model} "
                         f"({info.context_length}); pass --max-length {info.context_length} or less")
    window = window_options(args, tokenizer)
    max_length, prefix_id = resolve_window(info.context_length, tokenizer, plan=args.plan,
                                           max_length=args.max_length, prefix_id=window["prefix_id"],
                                           every_window=window["every_window"])
    if args.stride is not None and args.stride > max_length:
        raise ValueError(f"--stride {args.stride} is above --max-length {max_length}; pass a smaller --stride")
    if args.plan == "chunks":
        window["score_from"] = max_length // 2 if args.score_from == "half" else args.score_from
        lmloss.plan_windows([], plan="chunks", max_length=max_length, score_from=window["score_from"],
                            max_chunks=args.chunks, prefix_id=prefix_id)  # its checks, before loading
        check_counts_scored_bytes(tokenizer)
    check_tokenizer_fits(tokenizer, info.vocab_size, args.model)
    specs = corpus_specs(args.dataset)
    check_corpus_options(specs, field=args.text_field, subset=args.subset)
    corpora = []
    for k, spec in enumerate(specs):
        docs = lmloss.load_corpus(spec, form=args.form, data_dir=args.data_dir, detokenize=args.detokenize,
                                  limit=args.limit, max_bytes=args.max_bytes,
                                  field=args.text_field if takes_field(spec) else None,  # each option only
                                  subset=args.subset if takes_subset(spec) else None)  # where it applies
        if args.plan == "chunks":  # before any checkpoint is touched and before the weights load
            check_fills_a_chunk(args, spec, tokenizer, docs, max_length, window["bos_in_tokens"])
        base = _checkpoint_base(args.output, k) if args.output else None
        if base is not None:
            fp = fingerprint(args.model, tokenizer, docs, plan=args.plan, max_length=max_length,
                             stride=args.stride, prefix_id=prefix_id, every_window=window["every_window"],
                             dtype=args.dtype, head_impl=args.head_impl, score_from=window["score_from"],
                             max_chunks=window["max_chunks"], bos_in_tokens=window["bos_in_tokens"])
            _checkpoint_policy(args, base, fp, docs, dist_ctx)
        corpora.append((spec, docs, base))
    return tokenizer, corpora, window


def _token_count_reaching(tokenizer, text: str, need: int) -> int:
    """len(encode_document(tokenizer, text)) where that is below `need`; where it is not, a count
    >= need that may come from a prefix of the text only (16 * need characters, then 4x longer), so
    that a long text is not tokenized a second time just to learn that it fills a chunk. A prefix
    counts only with a margin of need // 4 + 16 tokens: a cut changes the tokens at the cut alone."""
    from lmloss.tokenizers import encode_document

    chars = 16 * need
    while chars < len(text):
        n = len(encode_document(tokenizer, text[:chars]))
        if n >= need + need // 4 + 16:
            return n
        chars *= 4
    return len(encode_document(tokenizer, text))


def check_fills_a_chunk(args, spec: str, tokenizer, docs, max_length: int, bos_in_tokens: bool) -> None:
    """Plan "chunks" scores whole chunks of max_length tokens only: ValueError, before the model is
    loaded, unless some document's token list (BOS included when bos_in_tokens) holds one. The
    documents are tokenized until one does (see _token_count_reaching)."""
    longest = 0
    for doc in docs:
        longest = max(longest, _token_count_reaching(tokenizer, doc.text, max_length - bos_in_tokens)
                      + bos_in_tokens)
        if longest >= max_length:
            return
    fixes = [f"--max-length {longest} or less"] if longest >= 2 + (args.score_from if isinstance(
        args.score_from, int) else 0) else []
    if len(docs) > 1 and args.form != "stream":
        fixes.append("--form stream (the documents joined into one text, as llama.cpp and the GPTQ loop read a file)")
    if args.limit is not None or args.max_bytes is not None:
        fixes.append("a larger --limit / --max-bytes")
    raise ValueError(f"--dataset {spec}: plan 'chunks' scores whole chunks of {max_length} tokens (--max-length) "
                     f"and drops the rest, but the longest of its {len(docs)} documents has {longest} tokens"
                     f"{' (BOS included)' if bos_in_tokens else ''}, so no token would be scored. Pass "
                     + ", or ".join(fixes + ["a longer text"]))


def window_options(args, tokenizer) -> dict:
    """The evaluate() keywords that --plan, --add-bos, --bos-every-window, --score-from and --chunks
    decide, with the reason for the BOS choice (a note in the results)."""
    on, why = bos_in_tokens(args.add_bos, tokenizer)
    chunks = args.plan == "chunks"
    # llama.cpp writes BOS over each chunk's first token exactly when its token list starts with BOS.
    prefix_id = tokenizer.bos_id if chunks and args.bos_every_window and on else None
    return dict(bos_in_tokens=on, bos_note=f"BOS {'starts' if on else 'does not start'} each document's "
                f"token list ({why})", prefix_id=prefix_id, every_window=args.bos_every_window and not chunks,
                score_from=None, max_chunks=args.chunks)


def _checkpoint_policy(args, base: Path, fp: dict, docs, dist_ctx) -> None:
    """--resume: the checkpoint must verify now, not after the model is loaded. Without it, finished
    rows are never discarded unless --overwrite says so."""
    from lmloss.checkpoint import count_rows

    files = checkpoint_files(base)
    if args.resume:
        restore(base, fp, docs)
    elif sum(count_rows(f) for f in files) and not args.overwrite:
        raise ValueError(f"{files[0]} holds {sum(count_rows(f) for f in files)} finished documents of an "
                         f"earlier run with --output {args.output}: pass --resume to continue that run, or "
                         "--overwrite to discard them and start over")
    if not args.resume and dist_ctx.is_main:
        for path in files:  # every rank's, whatever the world size was
            path.unlink()
    if dist_ctx.world_size > 1:  # no rank reads the checkpoint before rank 0 has cleared it
        import torch.distributed as dist

        dist.barrier()


def _evaluate(args, model, tokenizer, docs, checkpoint, window: dict):
    try:
        result = lmloss.evaluate(model, tokenizer, docs, plan=args.plan, max_length=args.max_length,
                                 stride=args.stride, every_window=window["every_window"],
                                 prefix_id=window["prefix_id"], score_from=window["score_from"],
                                 max_chunks=window["max_chunks"], bos_in_tokens=window["bos_in_tokens"],
                                 batch_size=args.batch_size, head_impl=args.head_impl,
                                 keep_token_nll=bool(args.token_nll), progress=not args.no_progress,
                                 checkpoint=checkpoint, token_stats=args.token_stats)
        result.notes.append(window["bos_note"])
        return result
    except KeyboardInterrupt:
        if checkpoint:
            raise KeyboardInterrupt(f"finished documents are saved in {checkpoint}; run the same command "
                                    "with --resume to continue") from None
        raise


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
                elapsed_s=result.elapsed_s, tokens_per_s=result.tokens_per_s, notes=result.notes,
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
    from lmloss.evaluate import merge_token_stats

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


def run(args) -> dict:
    """The whole command; returns the results JSON document (empty on ranks other than 0). One
    corpus: config, totals, metrics, intervals, documents; several: {"corpora": [one such object
    per corpus], "pooled": {"totals", "metrics"}}."""
    check_outputs(args)
    dist_ctx = init_from_env(args.device)
    device = _device(args, dist_ctx)
    tokenizer, corpora, window = _preflight(args, dist_ctx)
    model = lmloss.load_model(args.model, device=device, dtype=args.dtype, cache=not args.no_cache)
    results = []
    for spec, docs, base in corpora:
        result = _evaluate(args, model, tokenizer, docs, base, window)
        result.config.update(dataset=spec, form=args.form, detokenize=args.detokenize, limit=args.limit,
                             max_bytes=args.max_bytes, resumed_documents=result.resumed_documents)
        results.append(result)
    out, written = {}, []
    try:
        if dist_ctx.is_main:
            cis = [bootstrap_ci(r.per_document, n_resamples=args.bootstrap) if args.bootstrap else {}
                   for r in results]
            for result, ci in zip(results, cis):
                report(args, result, ci)
            if len(results) == 1:
                out = results_json(args, results[0], cis[0])
            else:
                out = dict(corpora=[results_json(args, r, ci) for r, ci in zip(results, cis)],
                           pooled=pooled_json(results))
                print("\n" + corpora_table(results, cis))
            _write_outputs(args, out, results, cis, written)
    finally:
        _finish(dist_ctx, [base for _, _, base in corpora if base] if args.output in written else [])
    return out


def _write_outputs(args, out: dict, results, cis: list[dict], written: list[str]) -> None:
    """Results JSON, then the per-token NLL and the plot, through lmloss.outputs.write_all: each
    atomically, each path appended to `written` once complete; an error after the first is written
    says what was."""
    labels = {args.output: "results", args.token_nll: "per-token NLL", args.plot: "plot"}
    items = [(args.output, lambda tmp: tmp.write_bytes((json.dumps(out, indent=1) + "\n").encode("utf-8"))),
             (args.token_nll, lambda tmp: _save_token_nll(tmp, results)),
             (args.plot, lambda tmp: (save_plot(tmp, results[0]) if len(results) == 1
                                      else save_corpora_plot(tmp, results, cis)))]
    write_all([(path, writer) for path, writer in items if path], written=written,
              on_written=lambda path: print(f"{labels[path]}: {path}"))


def _save_token_nll(path: Path, results) -> None:
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


def _finish(dist_ctx, checkpoints: list[Path]) -> None:
    """After rank 0 has written the results: rank 0 deletes every rank's file of each checkpoint (a
    resumed run may have used other ranks), and every rank leaves the group it joined."""
    if dist_ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if dist_ctx.is_main:
        for path in (p for base in checkpoints for p in checkpoint_files(base)):
            path.unlink(missing_ok=True)
    if dist_ctx.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def main(argv=None) -> int:
    """Exit code: 0 done, 2 a bad input, 1 an unexpected error (each one line on stderr; --debug
    shows the traceback), 130 interrupted."""
    from lmloss.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv), own_process=argv is None)
