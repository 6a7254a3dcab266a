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
import os
from pathlib import Path

import lmloss
from lmloss.checkpoint import checkpoint_files, checkpoint_path, fingerprint, restore
from lmloss.cli_eval_report import (corpora_table, pooled_json, report, results_json, save_corpora_plot, save_plot,
                                    save_token_nll)
from lmloss.cli_options import (add_window_options, apply_preset, check_fills_a_chunk, corpus_specs,
                                window_options)
from lmloss.data import check_corpus_options, takes_field, takes_subset
from lmloss.distributed import init_from_env
from lmloss.evaluate import check_tokenizer_fits, resolve_window
from lmloss.results import bootstrap_ci
from lmloss.models import peek_config, resolve_device
from lmloss.outputs import check_output_path, write_all
from lmloss.prepare import check_counts_scored_bytes

__all__ = ["build_parser", "parse_args", "run", "main"]


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


def _device(args, dist_ctx) -> str:
    """--device, one GPU per rank under torchrun; ValueError if it is not on this machine."""
    import torch

    device = args.device
    if dist_ctx.enabled and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{dist_ctx.local_rank}"
    resolve_device(device)
    return device


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
             (args.token_nll, lambda tmp: save_token_nll(tmp, results)),
             (args.plot, lambda tmp: (save_plot(tmp, results[0]) if len(results) == 1
                                      else save_corpora_plot(tmp, results, cis)))]
    write_all([(path, writer) for path, writer in items if path], written=written,
              on_written=lambda path: print(f"{labels[path]}: {path}"))


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
