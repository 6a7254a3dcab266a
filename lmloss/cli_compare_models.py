"""`lmloss compare-models` (also `python scripts/compare_models.py`, `python -m lmloss compare-models`):
compare models on the same documents, two ways.

    # KL divergence against a reference that shares the vocabulary (llama.cpp's --kl-divergence):
    # mean KL with a bootstrap interval, its percentiles, top-1 agreement, delta p(target)
    lmloss compare-models --reference model-f32.gguf --model model-Q4_1.gguf --dataset wikitext --limit 8
    # paired bits per byte of any models under any tokenizers, one model loaded at a time
    lmloss compare-models --models gpt2,../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dataset wikitext --preset lm-eval --max-length 1024 --output cmp.json --plot cmp.png

The window options are lmloss eval's (presets included: --preset lm-eval). Every printed number
comes with the sums it is a ratio of. Bad inputs are found before any model's weights load and end
in one line "error: ..." with exit code 2 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import lmloss
from lmloss.cli_options import add_window_options, apply_preset, check_fills_a_chunk, corpus_specs, window_options
from lmloss.compare import compare, kl_divergence, paired_bootstrap, tokenizer_difference
from lmloss.data import check_corpus_options, takes_field, takes_subset
from lmloss.evaluate import check_tokenizer_fits, resolve_window
from lmloss.results import bootstrap_ci
from lmloss.models import DTYPES, peek_config, resolve_device
from lmloss.outputs import check_output_path, write_all
from lmloss.prepare import check_counts_scored_bytes

__all__ = ["build_parser", "parse_args", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmloss compare-models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--reference", help="KL mode: the reference model (hub name, folder or .gguf); needs --model")
    a("--model", help="KL mode: the model compared with --reference; same vocabulary")
    a("--models", help="paired mode: comma list of 2+ models, each scored with its own tokenizer")
    a("--tokenizer", help="KL mode: the tokenizer of both (default: the reference's own)")
    a("--tokenizers", help="paired mode: comma list, one per model (default: each model's own)")
    a("--dataset", default="wikitext", help="one corpus: a name (wikitext, lambada, ...), hf:PATH[:CONFIG[:SPLIT"
      "[:FIELD]]] or a .txt/.jsonl/.parquet path")
    add_window_options(a)  # --add-bos is decided per model (KL mode: by the shared tokenizer)
    a("--batch-size", type=int, help="windows per forward pass (default: lmloss.evaluate's)")
    a("--head-impl", choices=("fused", "logits"), default="fused", help="paired mode: output head + loss")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--dtype", default="float32", choices=sorted(DTYPES))
    a("--reference-dtype", choices=sorted(DTYPES),
      help="KL mode: the reference's dtype (default --dtype): --reference-dtype float32 --dtype bfloat16 measures "
           "what bf16 arithmetic costs one model")
    a("--limit", type=int, help="score only the first N documents")
    a("--max-bytes", type=int, help="score only the documents that hold the first B UTF-8 bytes")
    a("--subset", help="a part of a corpus that has parts (pile: a pile_set_name; paloma: a domain)")
    a("--text-field", help="the text field of a .jsonl/.parquet corpus (default: text, else page)")
    a("--output", help="write results as JSON here (atomically)")
    a("--plot", help="KL: per-position KL histogram and per-document mean KL; paired: bits per byte per "
      "model with intervals and a per-document scatter of the first pair (.png, .pdf or .svg)")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples over documents (0: no intervals)")
    a("--seed", type=int, default=0, help="seed of the bootstrap draws")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--no-cache", action="store_true", help="convert .gguf models again instead of using their converted copies "
      "under $LMLOSS_CACHE_DIR (default ~/.cache/lmloss)")
    a("--debug", action="store_true", help="show the traceback of an error")
    return p


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _check_mode(p: argparse.ArgumentParser, args) -> None:
    """Exactly one of: --reference A --model B (KL), or --models A,B[,...] (paired)."""
    if args.models is not None:
        if args.reference or args.model:
            p.error("--models (paired bits per byte) and --reference/--model (KL divergence) are two modes: "
                    "pass one of them")
        models = split_list(args.models)
        if len(models) < 2:
            p.error(f"--models needs 2 or more models, comma-separated, got {args.models!r}; e.g. --models "
                    "gpt2,SmolLM2-135M.gguf")
        if args.tokenizer:
            p.error("--tokenizer is for KL mode; with --models pass --tokenizers, one per model")
        if args.tokenizers is not None and len(split_list(args.tokenizers)) != len(models):
            p.error(f"--tokenizers names {len(split_list(args.tokenizers))} tokenizers for {len(models)} models: "
                    "pass one per model, in the order of --models")
        return
    if args.reference and not args.model:
        p.error("--reference needs --model, the model whose KL divergence from the reference is measured")
    if args.model and not args.reference:
        p.error("--model needs --reference (KL divergence); to compare several models by bits per byte "
                "pass --models A,B")
    if not args.reference:
        p.error("pass --reference A --model B (KL divergence, same vocabulary) or --models A,B[,C...] "
                "(paired bits per byte, any tokenizers)")
    if args.tokenizers:
        p.error("--tokenizers is for --models; in KL mode both models share one --tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    apply_preset(parser, argv)
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    for option, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size),
                          ("--limit", args.limit), ("--max-bytes", args.max_bytes),
                          ("--chunks", args.chunks)):
        if value is not None and value < 1:
            parser.error(f"{option} must be a positive number, got {value}")
    if args.stride is not None and (args.stride < 1 or (args.max_length and args.stride > args.max_length)):
        parser.error(f"--stride must be between 1 and --max-length ({args.max_length}), got {args.stride}")
    if args.stride is not None and args.plan != "sliding":
        parser.error(f"--stride is for --plan sliding; plan {args.plan!r} moves by --max-length")
    if (args.score_from is not None or args.chunks is not None) and args.plan != "chunks":
        parser.error(f"--score-from and --chunks are for --plan chunks, not {args.plan!r}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {args.bootstrap}")
    return args


# -- checks before any weight loads -----------------------------------------------------------------

def check_outputs(args) -> None:
    if args.output:
        check_output_path("--output", args.output, suffixes=(".json",))
    if args.plot:
        check_output_path("--plot", args.plot, suffixes=(".png", ".pdf", ".svg"))
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({e})") from None


def _window(args, spec: str, tokenizer, info) -> dict:
    """lmloss.evaluate's window keywords for one model, as lmloss eval decides them (--add-bos,
    --score-from half, BOS over chunks), after checking that the model's context takes --max-length
    and --stride and that the tokenizer fits its embedding. Its "bos_note" says why BOS is or is not in."""
    if args.max_length and info.context_length and args.max_length > info.context_length:
        raise ValueError(f"--max-length {args.max_length} is above the context length of {spec} "
                         f"({info.context_length}); pass --max-length {info.context_length} or less")
    window = window_options(args, tokenizer)
    max_length, prefix_id = resolve_window(info.context_length, tokenizer, plan=args.plan, max_length=args.max_length,
                                           prefix_id=window["prefix_id"], every_window=window["every_window"])
    if args.stride is not None and args.stride > max_length:
        raise ValueError(f"--stride {args.stride} is above --max-length {max_length} of {spec}; pass a smaller "
                         "--stride")
    if args.plan == "chunks":
        window["score_from"] = max_length // 2 if args.score_from == "half" else args.score_from
        lmloss.plan_windows([], plan="chunks", max_length=max_length, score_from=window["score_from"],
                            max_chunks=args.chunks, prefix_id=prefix_id)  # its checks, before loading
        check_counts_scored_bytes(tokenizer)
    check_tokenizer_fits(tokenizer, info.vocab_size, spec)
    window["max_length"] = max_length  # resolved: what check_fills_a_chunk measures the corpus against
    return window


def _check_chunks(args, spec: str, docs, tokenizers: list, windows: list[dict], names: list[str]) -> None:
    """Plan "chunks": every model's tokenizer fills at least one chunk of the corpus (lmloss eval's
    check_fills_a_chunk), before any weights load; the error names the model where there are several."""
    if args.plan != "chunks":
        return
    for name, tokenizer, window in zip(names, tokenizers, windows):
        try:
            check_fills_a_chunk(args, spec, tokenizer, docs, window["max_length"], window["bos_in_tokens"])
        except ValueError as err:
            raise ValueError(f"{name}: {err}" if len(names) > 1 else str(err)) from None


def _evaluate_keywords(args, window: dict) -> dict:
    keys = ("prefix_id", "every_window", "score_from", "max_chunks", "bos_in_tokens")
    return dict(plan=args.plan, max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
                progress=not args.no_progress, **{k: window[k] for k in keys})


def _load_corpus(args):
    specs = corpus_specs(args.dataset)
    if len(specs) != 1:
        raise ValueError(f"--dataset names {len(specs)} corpora ({', '.join(specs)}); compare-models scores one "
                         "corpus per run: pass one")
    check_corpus_options(specs, field=args.text_field, subset=args.subset)
    spec = specs[0]
    return spec, lmloss.load_corpus(spec, form=args.form, data_dir=args.data_dir, detokenize=args.detokenize,
                                    limit=args.limit, max_bytes=args.max_bytes,
                                    field=args.text_field if takes_field(spec) else None,
                                    subset=args.subset if takes_subset(spec) else None)


def _own_tokenizer(spec: str, cache: bool = True):
    """The model's own tokenizer, or None where its files hold none."""
    try:
        return lmloss.load_tokenizer(spec, cache=cache)
    except ValueError:
        return None


def _kl_preflight(args, notes: list[str]):
    """The shared tokenizer, checked against each model's own and both configurations."""
    shared = lmloss.load_tokenizer(args.tokenizer or args.reference, cache=not args.no_cache)
    for role, spec in (("reference", args.reference), ("model", args.model)):
        own = shared if role == "reference" and not args.tokenizer else _own_tokenizer(spec, not args.no_cache)
        if own is None:
            notes.append(f"--{role} {spec} holds no tokenizer of its own: only its vocabulary size was checked")
            continue
        diff = tokenizer_difference(shared, own)
        if diff:
            raise ValueError(f"--{role} {spec} has another tokenizer than the shared one ({diff}); KL divergence "
                             "needs one vocabulary: compare these models by bits per byte with --models A,B")
    infos = [peek_config(args.reference), peek_config(args.model)]
    if infos[0].vocab_size and infos[1].vocab_size and infos[0].vocab_size != infos[1].vocab_size:
        raise ValueError(f"KL divergence needs one vocabulary, but --reference {args.reference} has "
                         f"{infos[0].vocab_size} output classes and --model {args.model} has {infos[1].vocab_size}: "
                         "compare them by bits per byte with --models A,B")
    # one window plan for both: the shorter context, the reference's configuration for --add-bos lm-eval
    contexts = [i.context_length for i in infos if i.context_length]
    both = dataclasses.replace(infos[0], context_length=min(contexts) if contexts else None)
    window = _window(args, f"{args.reference} and {args.model}", shared, both)
    check_tokenizer_fits(shared, infos[1].vocab_size, args.model)
    if args.reference == args.model and (args.reference_dtype or args.dtype) == args.dtype:
        notes.append("--reference and --model name the same model: its KL against itself is 0 up to rounding")
    notes.append(window["bos_note"])
    return shared, window


def _paired_preflight(args, models: list[str]) -> tuple[list, list[dict]]:
    """Each model's tokenizer and window keywords, checked against its configuration."""
    tokenizers = [lmloss.load_tokenizer(t, cache=not args.no_cache) for t in split_list(args.tokenizers) or models]
    windows = [_window(args, spec, tok, peek_config(spec)) for spec, tok in zip(models, tokenizers)]
    return tokenizers, windows


# -- tables ------------------------------------------------------------------------------------------

def _ci(ci) -> str:
    return f"[{ci[0]:.6f}, {ci[1]:.6f}]" if ci else "n/a"


def kl_table(kl: dict) -> str:
    """The KL statistics, each with the sums (or the rule) it comes from."""
    n = kl["n_positions"]
    interval = f"[{kl['ci'][0]:.6g}, {kl['ci'][1]:.6g}]" if kl["ci"] else "n/a"
    rows = [("mean_nats", kl["mean_nats"], interval, f"sum_kl_nats / n_positions = {kl['sum_kl_nats']:.10g} / {n}"),
            *((k, kl[k], "", f"percentile {q:g} of the {n} per-position KLs (numpy 'linear')")
              for k, q in (("median_nats", 50), ("p90_nats", 90), ("p99_nats", 99), ("p999_nats", 99.9))),
            ("top1_agreement", kl["top1_agreement"], "", f"n_top1_same / n_positions = {kl['n_top1_same']} / {n}"),
            ("delta_p_mean", kl["delta_p_mean"], "", f"sum_delta_p / n_positions = {kl['sum_delta_p']:.10g} / {n}"),
            ("delta_p_rms", kl["delta_p_rms"], "",
             f"sqrt(sum_delta_p_sq / n_positions) = sqrt({kl['sum_delta_p_sq']:.10g} / {n})")]
    lines = [f"{'KL(reference || model)':22s} {'value':>12s}  {'95% CI (docs)':28s} from"]
    lines += [f"{name:22s} {value:12.6g}  {ci:28s} {how}" for name, value, ci, how in rows]
    lines.append("KL in nats per scored position; delta_p = p_model(target) - p_reference(target)")
    return "\n".join(lines)


def _short(name: str) -> str:
    """A local file or folder by its own name; a hub name as it is."""
    return Path(name).name if Path(name).exists() else name


def models_table(names: list[str], totals: list, cis: list, comparable: bool) -> str:
    """One row per model: the sums, token perplexity and bits per byte (per char) from them."""
    lines = [f"{'model':32s} {'tokens':>9s} {'bytes':>10s} {'chars':>10s} {'nll_nats':>14s} {'token_ppl':>10s} "
             f"{'bits/byte':>9s}  {'95% CI (bits/byte)':22s} {'bits/char':>9s}"]
    for name, t, ci in zip(names, totals, cis):
        bpc = f"{t.bits_per_char:9.6f}" if t.n_chars else f"{'n/a':>9s}"
        lines.append(f"{_short(name)[-32:]:32s} {t.n_tokens:9d} {t.n_bytes:10d} {t.n_chars:10d} {t.nll_nats:14.4f} "
                     f"{t.token_perplexity:10.4f} {t.bits_per_byte:9.6f}  {_ci(ci):22s} {bpc}")
    flag = "" if comparable else " (not comparable: tokenizers differ)"
    lines.append(f"token_ppl = exp(nll_nats / tokens){flag}; bits/byte = nll_nats / (ln 2 * bytes); "
                 "bits/char = nll_nats / (ln 2 * chars)")
    return "\n".join(lines)


def pairs_table(names: list[str], paired) -> str:
    lines = [f"{'pair (a -> b)':40s} {'delta bits/byte':>15s}  {'95% CI (paired bootstrap)':26s} b better on"]
    for p in paired.pairs:
        a, b = paired.bits_per_byte[p.a], paired.bits_per_byte[p.b]
        lines.append(f"{(_short(names[p.a])[:18] + ' -> ' + _short(names[p.b])[:18]):40s} {p.delta_bits_per_byte:15.6f}  "
                     f"{_ci(p.ci):26s} {p.n_b_better}/{p.n_documents} documents ({p.share_b_better:.3f})")
        lines.append(f"{'':40s} = {b:.6f} - {a:.6f}")
    lines.append("delta = bpb(b) - bpb(a) of the pooled sums (negative: b is better); the interval resamples "
                 "documents once per draw for both")
    return "\n".join(lines)


# -- outputs -----------------------------------------------------------------------------------------

def _versions() -> dict:
    import torch
    import transformers

    return dict(lmloss=lmloss.__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version())


def _pair_json(names: list[str], p) -> dict:
    return dict(a=names[p.a], b=names[p.b], a_index=p.a, b_index=p.b, delta_bits_per_byte=p.delta_bits_per_byte,
                ci=list(p.ci) if p.ci else None, share_b_better=p.share_b_better, n_b_better=p.n_b_better,
                n_documents=p.n_documents)


def _model_json(name: str, totals, ci: dict) -> dict:
    return dict(model=name, totals=totals.to_dict(), metrics=totals.metrics(),
                confidence_intervals={k: list(v) for k, v in ci.items()})


def _save_figure(fig, path: str | Path) -> None:
    """The figure into the file `path`, its suffix picking the format."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, format=Path(path).suffix[1:].lower())
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_kl_plot(path: str | Path, result) -> None:
    """Histogram of the per-position KL (log bins), and the mean KL of each document, drawn into the
    file `path` (its suffix picks the format; the command passes write_all's temporary file)."""
    import numpy as np

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    kl = result.position_kl_nats.astype(np.float64)
    positive = kl[kl > 0]
    if positive.size:
        ax1.hist(positive, bins=np.geomspace(max(positive.min(), 1e-9), positive.max() * 1.001, 60))
        ax1.set_xscale("log")
    ax1.set(xlabel="KL(reference || model) at a position (nats)", ylabel="positions",
            title=f"{positive.size} of {kl.size} positions with KL > 0")
    docs = [d for d in result.per_document if d.n_positions]
    ax2.bar([d.index for d in docs], [d.kl_nats / d.n_positions for d in docs])
    ax2.axhline(result.mean_kl_nats, color="k", lw=0.8, ls="--", label="all positions")
    ax2.set(xlabel="document", ylabel="mean KL (nats)", title="mean KL by document")
    ax2.legend(loc="upper right")
    fig.suptitle(f"{result.config['reference']} vs {result.config['model']}", fontsize=9)
    _save_figure(fig, path)


def save_paired_plot(path: str | Path, names: list[str], results, paired) -> None:
    """Bits per byte per model with its interval, and per-document bpb of the first pair (b vs a),
    drawn into the file `path` (as save_kl_plot)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bpb = paired.bits_per_byte
    err = None
    if all(paired.bits_per_byte_ci):
        err = [[v - ci[0] for v, ci in zip(bpb, paired.bits_per_byte_ci)],
               [ci[1] - v for v, ci in zip(bpb, paired.bits_per_byte_ci)]]
    ax1.bar(range(len(bpb)), bpb, yerr=err, capsize=4)
    ax1.set_xticks(range(len(bpb)), [Path(n).name[-24:] for n in names], rotation=20, ha="right", fontsize=8)
    ax1.set(ylabel="bits per byte", title=f"bits per byte ({paired.level:.0%} bootstrap interval)")
    first = paired.pairs[0]
    docs = [(da.totals, db.totals) for da, db in zip(results[first.a].per_document, results[first.b].per_document)
            if da.totals.n_bytes and db.totals.n_bytes]
    xs, ys = [a.bits_per_byte for a, _ in docs], [b.bits_per_byte for _, b in docs]
    ax2.scatter(xs, ys, s=12)
    if xs:
        lo, hi = min(xs + ys), max(xs + ys)
        ax2.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="b = a")
        ax2.legend(loc="upper left")
    ax2.set(xlabel=f"a: {Path(names[first.a]).name[-30:]} (bits per byte)",
            ylabel=f"b: {Path(names[first.b]).name[-30:]} (bits per byte)",
            title=f"per document: b better on {first.n_b_better}/{first.n_documents}")
    _save_figure(fig, path)


def _write(args, out: dict, plot) -> None:
    """The results JSON, then the plot (plot(tmp) draws it into the file tmp), each atomically
    (lmloss.outputs.write_all); an error after the JSON says it is complete."""
    items = [(args.output, lambda tmp: tmp.write_bytes((json.dumps(out, indent=1) + "\n").encode("utf-8"))),
             (args.plot, plot)]
    labels = {args.output: "results", args.plot: "plot"}
    write_all([(path, writer) for path, writer in items if path],
              on_written=lambda path: print(f"{labels[path]}: {path}"))


# -- the two modes -----------------------------------------------------------------------------------

def run_kl(args) -> dict:
    notes: list[str] = []
    tokenizer, window = _kl_preflight(args, notes)
    spec, docs = _load_corpus(args)
    _check_chunks(args, spec, docs, [tokenizer], [window], [args.reference])
    reference = lmloss.load_model(args.reference, device=args.device, dtype=args.reference_dtype or args.dtype,
                                  cache=not args.no_cache)
    model = lmloss.load_model(args.model, device=args.device, dtype=args.dtype, cache=not args.no_cache)
    result = kl_divergence(reference, model, tokenizer, docs, **_evaluate_keywords(args, window))
    del reference, model
    n_resamples = args.bootstrap
    kl = result.summary(n_resamples=n_resamples, seed=args.seed)
    names = [args.reference, args.model]
    per_model = [result.documents("reference"), result.documents("model")]
    cis = [bootstrap_ci(d, n_resamples=n_resamples, seed=args.seed) if n_resamples else {} for d in per_model]
    paired = paired_bootstrap(per_model, n_resamples=n_resamples, seed=args.seed)
    notes += result.notes
    c = result.config
    print(f"\n{args.model} against {args.reference} on {spec} ({len(docs)} documents, plan {c['plan']}, max_length "
          f"{c['max_length']}): {result.n_positions} positions scored, {result.elapsed_s:.1f} s")
    for note in notes:
        print(f"note: {note}")
    print(kl_table(kl))
    totals = [result.reference_totals, result.model_totals]
    labels = [f"reference ({args.reference_dtype or args.dtype})", f"model ({args.dtype})"]  # files: header line
    print("\n" + models_table(labels, totals, [ci.get("bits_per_byte") for ci in cis], True))
    print("\n" + pairs_table(labels, paired))
    out = dict(config=dict(vars(args), resolved=dict(c, dataset=spec)), versions=_versions(), kl=kl,
               reference=_model_json(args.reference, totals[0], cis[0]),
               model=_model_json(args.model, totals[1], cis[1]), pair=_pair_json(names, paired.pairs[0]),
               documents=[d.to_dict() for d in result.per_document], notes=notes, elapsed_s=result.elapsed_s)
    _write(args, out, lambda tmp: save_kl_plot(tmp, result))
    return out


def run_paired(args) -> dict:
    notes: list[str] = []
    names = split_list(args.models)
    tokenizers, windows = _paired_preflight(args, names)
    spec, docs = _load_corpus(args)
    _check_chunks(args, spec, docs, tokenizers, windows, names)
    cmp = compare(names, docs, tokenizers=tokenizers, device=args.device, dtype=args.dtype, head_impl=args.head_impl,
                  cache=not args.no_cache,
                  per_model=[_evaluate_keywords(args, w) for w in windows], n_resamples=args.bootstrap,
                  seed=args.seed)
    notes += [f"{name}: {w['bos_note']}" for name, w in zip(names, windows)] + cmp.notes
    notes += [f"{name}: {n}" for name, r in zip(names, cmp.results) for n in r.notes]
    cis = [bootstrap_ci(r.per_document, n_resamples=args.bootstrap, seed=args.seed) if args.bootstrap else {}
           for r in cmp.results]
    print(f"\n{len(names)} models on {spec} ({len(docs)} documents, plan {args.plan}), each with its own tokenizer")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(models_table(names, [r.totals for r in cmp.results], cmp.paired.bits_per_byte_ci, cmp.same_tokenizer))
    print("\n" + pairs_table(names, cmp.paired))
    models = []
    for name, r, ci in zip(names, cmp.results, cis):
        row = _model_json(name, r.totals, ci)
        row.update(tokenizer=r.config.get("tokenizer"), config=r.config,
                   documents=[d.to_dict() for d in r.per_document])
        models.append(row)
    out = dict(config=dict(vars(args), dataset=spec), versions=_versions(), models=models,
               pairs=[_pair_json(names, p) for p in cmp.paired.pairs],
               token_perplexity_comparable=cmp.same_tokenizer, notes=list(dict.fromkeys(notes)))
    _write(args, out, lambda tmp: save_paired_plot(tmp, names, cmp.results, cmp.paired))
    return out


def run(args) -> dict:
    """The whole command; returns the results JSON document (written to --output when given)."""
    check_outputs(args)
    resolve_device(args.device)
    return run_paired(args) if args.models is not None else run_kl(args)


def main(argv=None) -> int:
    """Exit code: 0 done, 2 a bad input, 1 an unexpected error (each one line on stderr; --debug
    shows the traceback), 130 interrupted."""
    from lmloss.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv), own_process=argv is None)

