"""Evaluate a causal language model on a corpus: token, byte and word perplexity, bits per byte.

    python scripts/eval.py --model gpt2 --dataset wikitext                 # lm-eval's wikitext task
    python scripts/eval.py --model gpt2 --preset hf-sliding                # the HF perplexity guide
    # offline, with the shared assets
    LMLOSS_DATA_DIR=../shared/assets/corpora python scripts/eval.py \
        --model ../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \
        --preset lm-eval --max-length 1024 --output results.json --plot results.png

Presets are flat TOML files in configs/ (`--preset lm-eval` reads configs/lm-eval.toml, a path to a
.toml file works too); their keys are the long options below with "_" for "-", applied as defaults
so that the command line wins.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tomllib
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=os.environ.get("LMLOSS_MODEL") or "gpt2",
      help="hub name, local folder or .gguf file (default: $LMLOSS_MODEL, else gpt2)")
    a("--dataset", default="wikitext", help="corpus name (wikitext, lambada) or a .txt/.jsonl/.parquet path")
    a("--tokenizer", help="tokenizer spec (default: the model's)")
    a("--preset", help=f"configs/<name>.toml: {', '.join(sorted(f.stem for f in CONFIGS.glob('*.toml')))}")
    a("--plan", choices=("lm-eval", "sliding"), default="lm-eval", help="window plan (lmloss.windows)")
    a("--form", help="corpus form: pages, rows or stream (default: the corpus's own)")
    a("--detokenize", action=argparse.BooleanOptionalAction, default=False,
      help="apply lm-evaluation-harness's WikiText detokenizer; counts stay on the original text")
    a("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR"),
      help="offline corpora folder (default: $LMLOSS_DATA_DIR)")
    a("--max-length", type=int, help="model inputs per window (default: the model's context length)")
    a("--stride", type=int, help="sliding plan: how far windows move (default max_length // 2)")
    a("--bos-every-window", action=argparse.BooleanOptionalAction, default=False,
      help="put BOS (else EOS) at the start of every window")
    a("--batch-size", type=int, help="windows per forward pass (default: 2 on the CPU, where small "
      "batches stay in cache and ran 5-10%% faster than 4 or 8; 32 on a GPU, 8 if the model's head "
      "is not separable)")
    a("--head-impl", choices=("fused", "logits"), default="fused",
      help="output head + loss: fused linear cross-entropy, or logits of the scored rows + token_nll")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a("--limit", type=int, help="score only the first N documents")
    a("--output", help="write results as JSON here (atomically)")
    a("--plot", help="PNG: mean NLL by position in the window, and bits per byte per document")
    a("--token-nll", help="write every scored token's NLL (nats) per document to this .npz file")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples over documents (0: none)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--resume", action="store_true",
      help="continue an interrupted run from the checkpoint next to --output (same settings)")
    a("--overwrite", action="store_true",
      help="discard the checkpoint of an earlier run next to --output and start over")
    a("--text-field", help="the text field of a .jsonl/.parquet corpus (default: text, else page)")
    a("--debug", action="store_true", help="show the traceback of an error")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """argparse, with the preset's keys as defaults (the command line wins)."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        path = Path(known.preset) if known.preset.endswith(".toml") else CONFIGS / f"{known.preset}.toml"
        if not path.is_file():
            names = ", ".join(sorted(f.stem for f in CONFIGS.glob("*.toml")))
            parser.error(f"unknown preset {known.preset!r}: no {path}; presets: {names}")
        preset = tomllib.loads(path.read_text())
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(preset) - dests)
        if unknown:
            parser.error(f"preset {path} has unknown keys {unknown}; keys are option names with '_'")
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if args.stride is not None and (args.stride < 1 or (args.max_length and args.stride > args.max_length)):
        parser.error(f"--stride must be between 1 and --max-length ({args.max_length}), got {args.stride}")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be positive, got {args.max_length}")
    if args.stride is not None and args.plan != "sliding":
        parser.error(f"--stride is for --plan sliding; plan {args.plan!r} moves by --max-length")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {args.bootstrap}")
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
    from lmloss.outputs import check_output_path

    for option, path, suffixes in (("--output", args.output, (".json",)), ("--token-nll", args.token_nll, (".npz",)),
                                   ("--plot", args.plot, (".png", ".pdf", ".svg"))):
        if path:
            check_output_path(option, path, suffixes=suffixes)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({e})") from None


def default_batch_size(model) -> int:
    """Windows per forward pass when --batch-size is not given: 2 on the CPU (SmolLM2, 1024-token
    windows, this project's 2-core machine: batch 1-2 ran 5-10% faster than 4 or 8); 32 on a GPU,
    8 there for a model without a separable head, whose full (batch, T, V) logits must exist."""
    if model.device.type == "cpu":
        return 2
    return 32 if model.head is not None else 8


def format_table(result, ci: dict) -> str:
    t = result.totals
    rows = [("token_perplexity", f"exp(nll_nats / n_tokens) = exp({t.nll_nats:.4f} / {t.n_tokens})"),
            ("byte_perplexity", f"exp(nll_nats / n_bytes)  = exp({t.nll_nats:.4f} / {t.n_bytes})"),
            ("word_perplexity", f"exp(nll_nats / n_words)  = exp({t.nll_nats:.4f} / {t.n_words})"),
            ("bits_per_byte", f"nll_nats / (ln 2 * n_bytes) = {t.nll_nats:.4f} / (ln 2 * {t.n_bytes})")]
    metrics = result.metrics()
    lines = [f"{'metric':17s} {'value':>12s}  {'95% CI (bootstrap over documents)':34s} from the sums"]
    for name, how in rows:
        value = f"{metrics[name]:12.6f}" if name in metrics else f"{'n/a':>12s}"
        lo_hi = f"[{ci[name][0]:.6f}, {ci[name][1]:.6f}]" if name in ci else "n/a"
        lines.append(f"{name:17s} {value}  {lo_hi:34s} {how}")
    return "\n".join(lines)


def save_plot(path: str, result) -> None:
    """Mean NLL by input position of the prediction, and bits per byte of each document."""
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
    docs = [d for d in result.documents if d["n_bytes"] and d["n_tokens"]]
    ax2.bar([d["index"] for d in docs], [d["nll_nats"] / (math.log(2) * d["n_bytes"]) for d in docs])
    ax2.axhline(result.totals.bits_per_byte, color="k", lw=0.8, ls="--", label="all documents")
    ax2.set(xlabel="document", ylabel="bits per byte", title="bits per byte by document")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.legend(loc="lower right")
    fig.suptitle(f"{result.config['model']} - {result.config.get('dataset', '')}", fontsize=9)
    from lmloss.outputs import write_atomic

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(path).suffix[1:].lower())
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def fingerprint(args, tokenizer, documents, lmloss_version: str) -> dict:
    """What must match for a checkpoint's rows to belong to this run: the corpus by content, and
    every setting that changes a number (batch size and device change only float rounding)."""
    from lmloss.checkpoint import corpus_sha256

    return dict(model=args.model, tokenizer=getattr(tokenizer, "name", None), dataset=args.dataset,
                form=args.form, text_field=args.text_field, detokenize=args.detokenize, limit=args.limit,
                n_documents=len(documents), corpus_sha256=corpus_sha256(documents), plan=args.plan,
                max_length=args.max_length, stride=args.stride, bos_every_window=args.bos_every_window,
                dtype=args.dtype, head_impl=args.head_impl, lmloss=lmloss_version)


def resume_state(args, fp: dict, documents) -> dict[int, dict]:
    """Rows an earlier run of the same --output finished, every one verified; {} for a fresh start.
    Refuses to discard finished rows unless --overwrite says so."""
    from lmloss.checkpoint import check_rows, checkpoint_files, count_rows, read_checkpoint

    if not args.output:
        return {}
    files = checkpoint_files(args.output)
    if not args.resume:
        n_rows = sum(count_rows(f) for f in files)
        if n_rows and not args.overwrite:
            raise ValueError(f"{files[0]} holds {n_rows} finished documents of an earlier run with "
                             f"--output {args.output}: pass --resume to continue that run, or "
                             "--overwrite to discard them and start over")
        return {}
    done: dict[int, dict] = {}
    for path in files:
        rows = read_checkpoint(path, fp)
        twice = sorted(set(rows) & set(done))
        if twice:
            raise ValueError(f"documents {twice[:5]} are recorded in two checkpoint files of {args.output} "
                             f"({path} and another); pass --overwrite to start over")
        done.update(rows)
    check_rows(done, documents)
    return done


def _preflight(args, dist_ctx):
    """Corpus, tokenizer, the model's configuration (not its weights) and the checkpoint, each
    checked before the model is loaded: (documents, tokenizer, fingerprint, rows done)."""
    import lmloss
    from lmloss.evaluate import check_tokenizer_fits
    from lmloss.models import peek_config

    docs = lmloss.load_corpus(args.dataset, form=args.form, data_dir=args.data_dir,
                              detokenize=args.detokenize, limit=args.limit, field=args.text_field)
    tokenizer = lmloss.load_tokenizer(args.tokenizer or args.model)
    info = peek_config(args.model)
    if args.max_length and info.context_length and args.max_length > info.context_length:
        raise ValueError(f"--max-length {args.max_length} is above the context length of {args.model} "
                         f"({info.context_length}); pass --max-length {info.context_length} or less")
    window = args.max_length or info.context_length
    if args.stride is not None and window and args.stride > window:
        raise ValueError(f"--stride {args.stride} is above --max-length {window}; pass a smaller --stride")
    check_tokenizer_fits(tokenizer, info.vocab_size, args.model)
    fp = fingerprint(args, tokenizer, docs, lmloss.__version__)
    done = resume_state(args, fp, docs)
    if args.overwrite and dist_ctx.is_main:
        from lmloss.checkpoint import checkpoint_files

        for path in checkpoint_files(args.output):  # every rank's, whatever the world size was
            path.unlink()
    if dist_ctx.world_size > 1:  # every rank has read the checkpoints before any rank writes
        import torch.distributed as dist

        dist.barrier()
    return docs, tokenizer, fp, done


def run(args) -> dict:
    import torch
    import transformers

    import lmloss
    from lmloss.checkpoint import Checkpoint, checkpoint_path
    from lmloss.distributed import gather_rows, init_from_env, shard_documents
    from lmloss.evaluate import bootstrap_ci
    from lmloss.models import resolve_device

    check_outputs(args)
    dist_ctx = init_from_env(args.device)
    device = args.device
    if dist_ctx.enabled and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{dist_ctx.local_rank}"  # one GPU per rank
    resolve_device(device)
    docs, tokenizer, fp, done = _preflight(args, dist_ctx)
    model = lmloss.load_model(args.model, device=device, dtype=args.dtype)

    # 1. This rank's documents: a deal of the whole corpus, whatever is done, so that a resumed run
    #    forms the same batches as an uninterrupted one.
    mine = shard_documents([len(d.text) for d in docs], dist_ctx.rank, dist_ctx.world_size)
    ckpt = Checkpoint(checkpoint_path(args.output, dist_ctx.rank), fp, keep=args.resume) if args.output else None
    if dist_ctx.is_main and (done or dist_ctx.world_size > 1):
        print(f"{len(done)} documents from the checkpoint, {len(docs) - len(done)} to score on "
              f"{dist_ctx.world_size} process(es)", file=sys.stderr)

    # 2. Score them; each finished document goes to the checkpoint at once (flushed, fsynced).
    try:
        result = lmloss.evaluate(model, tokenizer, docs, plan=args.plan, max_length=args.max_length,
                                 stride=args.stride, every_window=args.bos_every_window,
                                 batch_size=args.batch_size or default_batch_size(model),
                                 head_impl=args.head_impl, keep_token_nll=bool(args.token_nll),
                                 indices=mine, done_rows={i: done[i] for i in mine if i in done},
                                 progress=not args.no_progress and dist_ctx.is_main,
                                 on_document=ckpt.append if ckpt else None)
    except KeyboardInterrupt:
        if ckpt:
            ckpt.close()
            raise KeyboardInterrupt(f"{ckpt.n_appended} more documents are saved in {ckpt.path}; run the "
                                    "same command with --resume to continue") from None
        raise

    # 3. Every rank's rows (restored ones included), summed in document order: the same float64
    #    sums in the same order as one uninterrupted process.
    rows = gather_rows(result.documents, dist_ctx)
    result.documents = rows
    result.totals = lmloss.LossTotals.from_rows(rows)
    if result.totals.n_tokens == 0:
        raise ValueError(f"0 tokens scored in {len(docs)} documents of {args.dataset!r}: nothing to report")
    if dist_ctx.world_size > 1:
        import torch.distributed as dist

        parts: list = [None] * dist_ctx.world_size
        dist.all_gather_object(parts, (result.elapsed_s, result.position_nll_nats, result.position_count))
        result.elapsed_s = max(p[0] for p in parts)
        result.position_nll_nats = [sum(v) for v in zip(*(p[1] for p in parts))]
        result.position_count = [sum(v) for v in zip(*(p[2] for p in parts))]
    result.config.update(dataset=args.dataset, form=args.form, detokenize=args.detokenize,
                         limit=args.limit, n_documents=len(docs), world_size=dist_ctx.world_size,
                         resumed_documents=len(done), corpus_sha256=fp["corpus_sha256"])
    if not dist_ctx.is_main:
        _finish_rank(dist_ctx, ckpt, None)
        return {}
    ci = bootstrap_ci(result.documents, n_resamples=args.bootstrap) if args.bootstrap else {}
    out = dict(config=dict(vars(args), resolved=result.config),
               versions=dict(lmloss=lmloss.__version__, torch=torch.__version__,
                             transformers=transformers.__version__, python=platform.python_version()),
               totals=result.totals.to_dict(), metrics=result.metrics(),
               confidence_intervals={k: list(v) for k, v in ci.items()},
               elapsed_s=result.elapsed_s, tokens_per_s=result.tokens_per_s, notes=result.notes,
               documents=result.documents)
    print(f"\n{model.name} on {args.dataset} ({len(docs)} documents, plan {args.plan}, max_length "
          f"{result.config['max_length']}): {result.totals.n_tokens} tokens scored; this run "
          f"{sum(r['n_tokens'] for r in rows if r['index'] not in done)} in {result.elapsed_s:.1f} s")
    for note in result.notes:
        print(f"note: {note}")
    print(format_table(result, ci))
    written: list[str] = []
    try:
        _write_outputs(args, out, result, mine, done, dist_ctx, written)
    finally:
        _finish_rank(dist_ctx, ckpt, args.output if args.output in written else None)
    return out


def _write_outputs(args, out: dict, result, mine, done, dist_ctx, written: list[str]) -> None:
    """Results JSON, then the per-token NLL and the plot (each atomically), each path appended to
    `written` once complete; an error after the first is written says what was."""
    from lmloss.outputs import write_atomic

    try:
        if args.output:
            write_atomic(args.output, (json.dumps(out, indent=1) + "\n").encode("utf-8"))
            written.append(args.output)
            print(f"results: {args.output}")
        if args.token_nll:
            import numpy as np

            if dist_ctx.world_size > 1 or done:
                print("note: --token-nll holds only this process's documents of this run")
            buf = io.BytesIO()
            np.savez(buf, **{f"doc_{i}": t.numpy() for i, t in zip(mine, result.token_nll) if i not in done})
            write_atomic(args.token_nll, buf.getvalue())
            written.append(args.token_nll)
            print(f"per-token NLL: {args.token_nll}")
        if args.plot:
            save_plot(args.plot, result)
            print(f"plot: {args.plot}")
    except Exception as err:
        if not written:
            raise
        raise ValueError(f"{type(err).__name__}: {err} (already written, complete: {', '.join(written)})") from err


def _finish_rank(dist_ctx, ckpt, results_written: str | None) -> None:
    """After rank 0 has written the results: every rank closes its checkpoint, rank 0 deletes every
    checkpoint file of the output (a resumed run may have used other ranks), all leave the group."""
    from lmloss.checkpoint import checkpoint_files

    if ckpt:
        ckpt.close()
    if dist_ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if dist_ctx.is_main and results_written:
        for path in checkpoint_files(results_written):
            path.unlink(missing_ok=True)
    if dist_ctx.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, ImportError) as err:  # a user's input: a message, not a traceback
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # not the input's fault: still one line, the traceback on request
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {err}\n(no results were written; rerun with "
              "--debug for the traceback and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
