"""End-to-end evaluation on a GPU: lmloss against lm-evaluation-harness's HF backend on the same card,
the same model and the same WikiText-2 pages, with the same numbers document by document (#14 item 4).

    # GPU (scripts/gpu_check.sh, section eval_e2e): GPT-2-small-shaped model, all 62 test pages,
    # bfloat16 timed side by side, then float32 for parity at float32 precision
    python scripts/bench_eval_gpu.py --json /tmp/eval_e2e.json
    # the whole pipeline on the CPU at tiny size, lm-eval from a virtual environment of its own
    python scripts/bench_eval_gpu.py --device cpu --size tiny --pages 2 --lm-eval-max-batch-size 8 \
        --lm-eval-python /work/peers/lmeval-venv/bin/python

The model. No real weights travel to a lent GPU machine (64 MiB for everything), so the model is
built where it runs: GPT2LMHeadModel(GPT2Config(**SIZES[size], initializer_range=init_std)) after
torch.manual_seed(seed), saved with save_pretrained (float32) in a temporary folder together with
the GPT-2 tokenizer files ($LMLOSS_ASSETS/tokenizers/hf-gpt2). init_std 0.05 spreads the logits
(std about sqrt(768) x 0.05 = 1.4 nats, not 0.55 at GPT-2's 0.02), so that the context a token is
scored from shows in the sums (a last window fed less context moves a page 3-20x more than at
0.02). Both tools load that folder in the same dtype:
  lmloss   as `scripts/eval.py --model FOLDER --dtype bfloat16 --plan lm-eval --detokenize` does:
           load_model, load_tokenizer, load_corpus("wikitext", form="pages", detokenize=True),
           evaluate(plan="lm-eval", max_length=the model's context, batch_size=lmloss's default
           for the device: 32 on a GPU, 2 on the CPU; --batch-sizes adds others), fused head.
  lm-eval  HFLM(pretrained=FOLDER, dtype=..., batch_size="auto", max_batch_size=64 (its default),
           max_length=the same context) on its wikitext task (loglikelihood_rolling), read from the
           local document-level file through bench_eval.py's task YAML; if that path fails to
           import or run, the same requests (its own wikitext_detokenizer on the same pages) go
           straight to HFLM.loglikelihood_rolling, and the result says so ("mode").
Each runs in a process of its own, one after the other, so that neither holds GPU memory while
the other runs (lm-eval sizes its batch to the memory it finds free).

Timed: lmloss's EvalResult.elapsed_s (tokenizing + scoring, after a warm-up on the first page that
compiles the Triton kernels); lm-eval's loglikelihood_rolling call (tokenizing + its batch-size
detection, five forward passes at the largest batch, + scoring), synchronized; the detection is
also reported alone and the speed-up is printed with and without it. Each tool evaluates the pages
--repeats times (default 3) in its process; the median run is reported (for lm-eval with that run's
detection), every run's seconds are kept, and the first run gives the per-page numbers, with a
check that every run gave the same. (One run each had lmloss's batch 64 at 0.97 s in one call and
1.46 s in the next on one H200.) tokens/s = scored tokens /
seconds, the same count for both (every token of every page is scored once).

Parity, per page: rel = |ll_lmloss - ll_lmeval| / |ll_lmeval| <= REL_TOL[dtype], and the same number
of tokens scored.
  float32: 1e-5. The two differ only in the order of float32 additions (8e-9 on the CPU), while a
  last window fed less context than lm-eval feeds it moves a page by 6e-5 to 6e-4 (the tiny
  model's first pages; bench_eval.py's 1e-4 would miss some). This run tells wrong windows from
  right ones.
  bfloat16: 2^-7, lm-eval's own rounding at its worst. It takes log_softmax and each window's .sum()
  in the logits' dtype, so each log-probability and then each window's sum is rounded to bfloat16
  (8 significant bits: up to 2^-8 relative each); a page of one window moves by up to 2^-8 from the
  second rounding alone, so no bfloat16 implementation can be held closer to it than that. lmloss
  takes the loss in float32 and sums in float64 from the same bfloat16 forward pass.
With both dtypes run, each tool's bfloat16 pages are also compared with lmloss's float32 pages (how
far each is from the float32 result).

Preparing .whl/ (the device has no network and Python 3.12; its image lacks lm_eval, datasets,
evaluate and their own missing needs), in the repository root, with any pip:
    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
       --platform manylinux1_x86_64 -d .whl"  # the device README's recipe (all of these: pure Python)
    pip download $P lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
        pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
        tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 pytz==2026.6 nltk==3.10.4 defusedxml==0.7.1 \
        more_itertools==11.2.1
    # three are published as source only (pure Python): build their wheels here
    pip wheel --no-deps --no-binary=:all: -w .whl rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
13.3 MB (lm_eval's own wheel is 9.1 MB of it). Every other need of these (Requires-Dist,
typepy[datetime], fsspec[http]) is in the device image (KINDS.md). gpu_check.sh installs .whl/*.whl
into /tmp/site and puts it on PYTHONPATH; lm-eval then runs under this same python (--lm-eval-python
defaults to sys.executable). To run only this benchmark there, with .whl and .devassets carried:
    GPU_CHECK_SECTIONS="env eval_e2e" bash scripts/gpu_check.sh
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lmloss from a checkout


def _bench_eval():
    """scripts/bench_eval.py as a module: its lm-eval task YAML and FLOPs per token, not copies."""
    spec = importlib.util.spec_from_file_location("bench_eval", Path(__file__).resolve().parent / "bench_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BENCH_EVAL = _bench_eval()
_TASK_YAML, _TASK_PY, _flops_per_token = _BENCH_EVAL._TASK_YAML, _BENCH_EVAL._TASK_PY, _BENCH_EVAL._flops_per_token

SIZES = {  # GPT2Config keywords; vocabulary: GPT-2's 50257 (its tokenizer's)
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),  # 124M, GPT-2 small
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=128),  # CPU checks
}
REL_TOL = {"float32": 1e-5, "bfloat16": 2.0**-7}
TASK = "wikitext_lmloss_bench"

# Runs under --lm-eval-python: HFLM on the wikitext task (or its requests directly), timed.
_LM_EVAL_DRIVER = r"""
import json, sys, time, types
import importlib.metadata as md
cfg = json.loads(sys.argv[1])
import torch
from lm_eval.models.huggingface import HFLM
cuda = cfg["device"].startswith("cuda")
def sync():
    if cuda:
        torch.cuda.synchronize()
torch.manual_seed(0)
lm = HFLM(pretrained=cfg["folder"], dtype=cfg["dtype"], device=cfg["device"], max_length=cfg["max_length"],
          batch_size="auto", max_batch_size=cfg["max_batch_size"])
rolling, detect = lm.loglikelihood_rolling, lm._detect_batch_size
spent = dict(rolling_s=0.0, detect_s=0.0, batch_size=None, texts=[])
def timed_detect(*args, **kwargs):
    t = time.perf_counter()
    bs = detect(*args, **kwargs)
    sync()
    spent["detect_s"] += time.perf_counter() - t
    spent["batch_size"] = bs
    return bs
def timed_rolling(requests, *args, **kwargs):  # the scoring, tokenizing included, as lmloss's elapsed_s
    sync()
    t = time.perf_counter()
    out = rolling(requests, *args, **kwargs)
    sync()
    spent["rolling_s"] += time.perf_counter() - t
    spent["texts"] += [r.args[0] for r in requests]
    return out
lm._detect_batch_size, lm.loglikelihood_rolling = timed_detect, timed_rolling
if cuda:
    torch.cuda.reset_peak_memory_stats()
def evaluate_once():  # -> (log-likelihoods, metrics, mode); spent[] holds its times
    if cfg["mode"] == "task":
        try:
            from lm_eval import simple_evaluate
            from lm_eval.tasks import TaskManager
            out = simple_evaluate(model=lm, tasks=[cfg["task"]], limit=cfg["limit"], log_samples=True,
                                  task_manager=TaskManager(include_path=cfg["task_dir"]), bootstrap_iters=0)
            samples = sorted(out["samples"][cfg["task"]], key=lambda s: s["doc_id"])
            ll = [float(s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]) for s in samples]
            res = out["results"][cfg["task"]]
            return ll, {k.split(",")[0]: v for k, v in res.items() if "," in k and "stderr" not in k}, "task"
        except Exception as err:
            if not cfg["fallback"]:
                raise
            cfg["mode"] = f"direct, the task path failed: {type(err).__name__}: {err}"
            spent.update(rolling_s=0.0, detect_s=0.0, texts=[])
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    with open(cfg["data_file"]) as f:
        pages = [json.loads(line)["page"] for line in f][:cfg["limit"]]
    reqs = [types.SimpleNamespace(args=(wikitext_detokenizer({"page": p}),)) for p in pages]
    return lm.loglikelihood_rolling(reqs), {}, cfg["mode"]
runs = []
for _ in range(cfg["repeats"]):  # each call detects its batch size again, as lm-eval does per call
    spent.update(rolling_s=0.0, detect_s=0.0, texts=[])
    ll_k, metrics_k, mode = evaluate_once()
    runs.append(dict(elapsed_s=spent["rolling_s"], detect_s=spent["detect_s"], loglikelihoods=ll_k))
    if len(runs) == 1:
        ll, metrics = ll_k, metrics_k
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
n_tokens = sum(len(lm.tok_encode(t)) for t in spent["texts"])  # after the clock: every token is scored once
dists = md.packages_distributions()
loaded = sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})
versions = dict(lm_eval_path=sys.modules["lm_eval"].__file__)
for name in ("lm_eval", "datasets", "transformers", "torch", "pyarrow", "fsspec", "huggingface_hub"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
mid = sorted(runs, key=lambda r: r["elapsed_s"])[len(runs) // 2]  # the median run, its detection with it
print("RESULT " + json.dumps(dict(elapsed_s=mid["elapsed_s"], detect_s=mid["detect_s"],
      runs_s=[r["elapsed_s"] for r in runs], detect_runs_s=[r["detect_s"] for r in runs],
      repeats_identical=all(r["loglikelihoods"] == ll for r in runs), batch_size=spent["batch_size"],
      n_tokens=n_tokens, peak_mem_mib=peak, loglikelihoods=ll, metrics=metrics, mode=mode, versions=versions,
      distributions=loaded)))
"""


def build_model(folder: Path, *, size: str, seed: int, init_std: float, tokenizer_dir: Path) -> dict:
    """A randomly initialised GPT-2-shaped model (seeded) with GPT-2's tokenizer files, saved in `folder`:
    GPT2LMHeadModel(GPT2Config(**SIZES[size], initializer_range=init_std)).save_pretrained(folder)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if not (tokenizer_dir / n).is_file()]
    if missing:
        raise ValueError(f"{tokenizer_dir} lacks {missing}: pass --tokenizer-dir with GPT-2's Hugging Face "
                         "tokenizer files (the shared assets' tokenizers/hf-gpt2)")
    torch.manual_seed(seed)
    module = GPT2LMHeadModel(GPT2Config(**SIZES[size], initializer_range=init_std))
    module.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return dict(size=size, seed=seed, init_std=init_std, n_params=sum(p.numel() for p in module.parameters()),
                context=module.config.n_positions, flops_per_token=_flops_per_token(module, module.config.n_positions))


def run_lmloss(cfg: dict) -> dict:
    """lmloss on the pages (worker process): per batch size, a warm-up on the first page, then the
    timed evaluation cfg["repeats"] times; the median run's time, every run's, per-page log-likelihoods
    (the first run's, and whether every run gave the same), the sums and peak GPU memory."""
    import torch

    import lmloss

    cuda = cfg["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = lmloss.load_model(cfg["folder"], device=cfg["device"], dtype=cfg["dtype"])
    tok = lmloss.load_tokenizer(cfg["folder"])
    docs = lmloss.load_corpus("wikitext", form="pages", detokenize=True, data_dir=cfg["data_dir"], limit=cfg["pages"])
    runs = []
    for batch_size in cfg["batch_sizes"]:
        kwargs = dict(plan="lm-eval", max_length=cfg["max_length"], batch_size=batch_size, progress=False)
        t = time.perf_counter()
        lmloss.evaluate(model, tok, docs[:1], **kwargs)  # warm-up: kernels compiled, allocator grown
        sync()
        warmup_s = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        repeats = []
        for _ in range(cfg["repeats"]):
            res = lmloss.evaluate(model, tok, docs, **kwargs)
            sync()
            repeats.append(res)
        first, mid = repeats[0], sorted(repeats, key=lambda r: r.elapsed_s)[len(repeats) // 2]
        sums = first.totals
        lls = [[-d.totals.nll_nats for d in r.per_document] for r in repeats]
        runs.append(dict(batch_size=first.config["batch_size"], elapsed_s=mid.elapsed_s, warmup_s=warmup_s,
                         prepare_s=mid.prepare_s, runs_s=[r.elapsed_s for r in repeats],
                         repeats_identical=all(x == lls[0] for x in lls),
                         n_tokens=sums.n_tokens, n_inputs=sum(w.n_inputs for w in first.windows), n_bytes=sums.n_bytes,
                         n_words=sums.n_words, nll_nats=sums.nll_nats, metrics=first.metrics(), loglikelihoods=lls[0],
                         peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None))
    return dict(runs=runs, notes=res.notes, head="fused" if model.head is not None else "logits",
                device_name=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                versions=dict(lmloss=lmloss.__version__, torch=torch.__version__))


def _run_worker(cmd: list[str], *, env: dict, cwd, timeout_s: float, who: str) -> dict:
    """Run a worker process; its last 'RESULT {json}' line, or SystemExit with its stderr's tail."""
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:  # its output so far: bytes, not yet decoded
        tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        raise SystemExit(f"{who} ran past {timeout_s:.0f} s (--worker-timeout):\n{tail[-3000:]}") from None
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{who} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def compare(ours: list[float], theirs: list[float], *, rel_tol: float) -> dict:
    """Per-document parity: rel[i] = |ours[i] - theirs[i]| / |theirs[i]|; same when both hold the
    same number of documents, every value is finite and max(rel) <= rel_tol. Also the corpus sums
    (float64, document order) and their relative difference."""
    if len(ours) != len(theirs):
        return dict(same=False, why=f"{len(ours)} documents against {len(theirs)}", n_documents=len(theirs),
                    max_rel_diff=math.nan, worst_document=None, rel_tol=rel_tol)
    if not all(math.isfinite(x) for x in [*ours, *theirs]):
        return dict(same=False, why="a non-finite log-likelihood", n_documents=len(theirs), max_rel_diff=math.nan,
                    worst_document=None, rel_tol=rel_tol)
    rel = [abs(a - b) / abs(b) if b else (0.0 if a == b else math.inf) for a, b in zip(ours, theirs)]
    worst = max(range(len(rel)), key=rel.__getitem__) if rel else None
    max_rel = rel[worst] if rel else 0.0
    sum_ours, sum_theirs = math.fsum(ours), math.fsum(theirs)
    same = max_rel <= rel_tol
    return dict(same=same, why="" if same else f"document {worst}: relative difference {max_rel:.2e} > {rel_tol:.1e}",
                n_documents=len(rel), max_rel_diff=max_rel, worst_document=worst, rel_tol=rel_tol,
                sum_ours=sum_ours, sum_theirs=sum_theirs,
                sum_rel_diff=abs(sum_ours - sum_theirs) / abs(sum_theirs) if sum_theirs else math.nan)


def _lm_eval_task(workdir: Path, data_file: Path) -> Path:
    task_dir = workdir / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{TASK}.yaml").write_text(_TASK_YAML.format(data_file=data_file))
    (task_dir / "preprocess_wikitext.py").write_text(_TASK_PY)
    return task_dir


def run_dtype(args, dtype: str, folder: Path, context: int, workdir: Path) -> dict:
    """Both tools in `dtype`, lmloss first, each in its own process: their results and the parity."""
    data_file = Path(args.data_dir).resolve() / "wikitext-2-raw-v1" / "test.document_level.jsonl"
    # Hugging Face tokenizers' thread pool left as a user has it (on unless TOKENIZERS_PARALLELISM says
    # otherwise) for both: lmloss encodes the pages in parallel (encode_documents), lm-eval one by one.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / "hf_datasets"))
    cfg = dict(folder=str(folder), device=args.device, dtype=dtype, data_dir=str(Path(args.data_dir).resolve()),
               pages=args.pages, max_length=context, batch_sizes=args.batch_sizes, repeats=args.repeats)
    ours = _run_worker([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env, cwd=None,
                       timeout_s=args.worker_timeout, who=f"lmloss ({dtype})")
    for r in ours["runs"]:  # printed now, in case lm-eval fails
        print(f"lmloss {dtype} batch {r['batch_size']}: {r['n_tokens']} tokens in {r['elapsed_s']:.2f} s, "
              f"nll_nats {r['nll_nats']:.4f}")
    lm_cfg = dict(folder=str(folder), device=args.device, dtype=dtype, max_length=context, limit=args.pages,
                  max_batch_size=args.lm_eval_max_batch_size, task=TASK, data_file=str(data_file),
                  task_dir=str(_lm_eval_task(workdir, data_file)), mode=args.lm_eval_mode, fallback=True,
                  repeats=args.repeats)
    theirs = _run_worker([args.lm_eval_python, "-c", _LM_EVAL_DRIVER, json.dumps(lm_cfg)], env=env, cwd=workdir,
                         timeout_s=args.worker_timeout, who=f"lm-eval ({dtype})")
    parity = [compare(r["loglikelihoods"], theirs["loglikelihoods"], rel_tol=REL_TOL[dtype]) for r in ours["runs"]]
    for r, q in zip(ours["runs"], parity):
        if q["same"] and r["n_tokens"] != theirs["n_tokens"]:
            q.update(same=False, why=f"{r['n_tokens']} tokens scored against lm-eval's {theirs['n_tokens']}")
    return dict(dtype=dtype, lmloss=ours, lm_eval=theirs, parity=parity)


def report(res: dict, flops_per_token: float) -> list[dict]:
    """Print the parity, the sums behind the numbers, and the speed; return one row per measurement."""
    dtype, ours, theirs = res["dtype"], res["lmloss"], res["lm_eval"]
    first, p = ours["runs"][0], res["parity"][0]
    print(f"\n== {dtype}: lm-eval mode {theirs['mode']}; lmloss head {ours['head']}")
    for r, q in zip(ours["runs"], res["parity"]):
        verdict = (f"All {q['n_documents']} per-document log-likelihoods match" if q["same"]
                   else f"MISMATCH ({q['why']})")
        print(f"{verdict} (lmloss batch {r['batch_size']}): max relative difference {q['max_rel_diff']:.2e} "
              f"<= {q['rel_tol']:.1e}?  corpus sums differ by {q.get('sum_rel_diff', math.nan):.2e}")
    n_bytes, ln2 = first["n_bytes"], math.log(2)
    lm_nll = -p.get("sum_theirs", math.nan)
    print(f"  {'':26s} {'lmloss':>16s} {'lm-eval':>16s}")
    print(f"  {'nll_nats = -sum(ll)':26s} {first['nll_nats']:16.4f} {lm_nll:16.4f}")
    print(f"  {'n_tokens scored':26s} {first['n_tokens']:16d} {theirs['n_tokens']:16d}")
    print(f"  {'n_bytes (original pages)':26s} {n_bytes:16d} {'':>16s}")
    print(f"  {'bits/byte = nll/(ln2*B)':26s} {first['nll_nats'] / (ln2 * n_bytes):16.6f} "
          f"{lm_nll / (ln2 * n_bytes):16.6f}  (lm-eval's own: {theirs['metrics'].get('bits_per_byte', math.nan):.6f})")
    print(f"  {'word_perplexity':26s} {first['metrics']['word_perplexity']:16.6f} "
          f"{theirs['metrics'].get('word_perplexity', math.nan):16.6f}  (exp(nll / {first['n_words']} words))")
    rows = [dict(tool="lmloss", dtype=dtype, batch_size=r["batch_size"], n_tokens=r["n_tokens"],
                 elapsed_s=r["elapsed_s"], tokens_per_s=r["n_tokens"] / r["elapsed_s"], warmup_s=r["warmup_s"],
                 prepare_s=r.get("prepare_s"), runs_s=r.get("runs_s"), repeats_identical=r.get("repeats_identical"),
                 peak_mem_mib=r["peak_mem_mib"], model_tflops=flops_per_token * r["n_inputs"] / r["elapsed_s"] / 1e12)
            for r in ours["runs"]]
    lm_s = theirs["elapsed_s"]
    rows.append(dict(tool="lm-eval", dtype=dtype, batch_size=f"auto={theirs['batch_size']}",
                     n_tokens=theirs["n_tokens"], elapsed_s=lm_s, tokens_per_s=theirs["n_tokens"] / lm_s,
                     detect_s=theirs["detect_s"], runs_s=theirs.get("runs_s"), detect_runs_s=theirs.get("detect_runs_s"),
                     repeats_identical=theirs.get("repeats_identical"), peak_mem_mib=theirs["peak_mem_mib"],
                     model_tflops=flops_per_token * first["n_inputs"] / lm_s / 1e12))
    print(f"\n  {'tool':8s} {'batch':>8s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} "
          f"{'peak MiB':>9s}  other")
    for r in rows:
        other = (f"warm-up {r['warmup_s']:.2f} s; of the seconds, tokenizing + planning {r['prepare_s']:.2f} s"
                 if "warmup_s" in r else f"its batch-size detection {r['detect_s']:.2f} s")
        if r.get("runs_s") and len(r["runs_s"]) > 1:
            other += (f"; median of runs {' / '.join(f'{x:.2f}' for x in r['runs_s'])} s"
                      f"{'' if r['repeats_identical'] else ' (NOT the same numbers in every run)'}")
        mem = f"{r['peak_mem_mib']:9.0f}" if r["peak_mem_mib"] is not None else f"{'-':>9s}"
        print(f"  {r['tool']:8s} {str(r['batch_size']):>8s} {r['n_tokens']:8d} {r['elapsed_s']:8.2f} "
              f"{r['tokens_per_s']:10.0f} {r['model_tflops']:8.2f} {mem}  {other}")
    speedup = rows[0]["tokens_per_s"] / rows[-1]["tokens_per_s"]
    no_detect = theirs["n_tokens"] / max(lm_s - theirs["detect_s"], 1e-9)
    print(f"  lmloss / lm-eval tokens/s ({dtype}): {speedup:.2f}x; {rows[0]['tokens_per_s'] / no_detect:.2f}x against "
          f"lm-eval without its batch-size detection. TFLOP/s = {flops_per_token / 1e6:.0f} MFLOP/token x "
          f"{first['n_inputs']} model inputs / seconds")
    for r, q in zip(rows, [*res["parity"], dict(same=all(q["same"] for q in res["parity"]), max_rel_diff=None)]):
        r.update(same_numbers=q["same"], max_rel_diff=q["max_rel_diff"],
                 speedup_vs_lm_eval=r["tokens_per_s"] / rows[-1]["tokens_per_s"])
    return rows


def drift_from_float32(results: dict) -> dict:
    """Each tool's bfloat16 pages against lmloss's float32 pages (batch of the first run): max and
    corpus relative difference; the smaller, the closer to the float32 result."""
    if "bfloat16" not in results or "float32" not in results:
        return {}
    ref = results["float32"]["lmloss"]["runs"][0]["loglikelihoods"]
    out = {}
    for name, ll in (("lmloss", results["bfloat16"]["lmloss"]["runs"][0]["loglikelihoods"]),
                     ("lm-eval", results["bfloat16"]["lm_eval"]["loglikelihoods"])):
        q = compare(ll, ref, rel_tol=math.inf)
        out[name] = dict(max_rel_diff=q["max_rel_diff"], sum_rel_diff=q.get("sum_rel_diff", math.nan))
    print("\nbfloat16 against lmloss float32, per page (max) and corpus sum: "
          + "; ".join(f"{k} {v['max_rel_diff']:.2e} / {v['sum_rel_diff']:.2e}" for k, v in out.items()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    assets = Path(os.environ.get("LMLOSS_ASSETS", Path(__file__).resolve().parents[1] / ".devassets"))
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a check at tiny size)")
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.05, help="GPT2Config.initializer_range")
    p.add_argument("--pages", type=int, default=62, help="first N WikiText-2 test pages (62: all)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma list, run in this order; the first is the "
                   "headline (bfloat16, as issue #14 asks)")
    p.add_argument("--batch-sizes", default="default", help="lmloss windows per forward pass, a comma list; "
                   "'default': lmloss's own default for the device (32 on a GPU); the first is the headline")
    p.add_argument("--lm-eval-max-batch-size", type=int, default=64, help="HFLM max_batch_size: where its "
                   "batch_size='auto' search starts (64: its default)")
    p.add_argument("--lm-eval-mode", choices=("task", "direct"), default="task",
                   help="task: its wikitext task through simple_evaluate (falls back to direct if that fails); "
                   "direct: the same requests to HFLM.loglikelihood_rolling")
    p.add_argument("--lm-eval-python", default=sys.executable, help="a python that imports lm_eval "
                   "(default: this one; gpu_check.sh puts the .whl/ wheels on its path)")
    p.add_argument("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR", str(assets / "corpora")))
    p.add_argument("--tokenizer-dir", default=str(assets / "tokenizers" / "hf-gpt2"))
    p.add_argument("--worker-timeout", type=float, default=600, help="seconds for each tool's process")
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations per tool and batch size, in one "
                   "process each (lm-eval detects its batch size in each); the median is reported, every run kept")
    p.add_argument("--json", help="write every result here (per-page log-likelihoods included)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_lmloss(json.loads(args.worker))))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}, but torch {torch.__version__} sees no CUDA GPU here; "
                             "pass --device cpu (with --size tiny) for a check of the pipeline")
    args.batch_sizes = [None if b == "default" else int(b) for b in args.batch_sizes.split(",")]
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: expected at least 1 timed evaluation per tool")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in REL_TOL]
    if unknown or not dtypes:
        raise SystemExit(f"--dtypes {args.dtypes!r}: expected a comma list of {sorted(REL_TOL)}")
    # gpu_check.sh's `timeout` signals this process only: SIGTERM -> SystemExit, on which
    # subprocess.run kills the worker, so that no orphan keeps the GPU from the next section.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    results, rows, drift = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="bench_eval_gpu_") as tmp:
        folder = Path(tmp) / "model"
        info = build_model(folder, size=args.size, seed=args.seed, init_std=args.init_std,
                           tokenizer_dir=Path(args.tokenizer_dir))
        print(f"model: GPT-2 shape {args.size} ({info['n_params'] / 1e6:.1f}M parameters, context {info['context']}, "
              f"seed {args.seed}, init std {args.init_std}), built in {time.perf_counter() - started:.1f} s; "
              f"{args.pages} WikiText-2 test pages; device {args.device}")
        for dtype in dtypes:  # the headline dtype first: its numbers are printed and saved before the next starts
            results[dtype] = run_dtype(args, dtype, folder, info["context"], Path(tmp))
            rows += report(results[dtype], info["flops_per_token"])
            drift = drift_from_float32(results)
            if args.json:
                save_json(args, rows=rows, drift=drift, info=info, results=results)
    head = results[dtypes[0]]
    lm, ours = head["lm_eval"], head["lmloss"]
    strict = rows[0]["tokens_per_s"] * (lm["elapsed_s"] - lm["detect_s"]) / lm["n_tokens"]
    same = all(q["same"] for r in results.values() for q in r["parity"])
    verdict = (("MET" if same and strict >= 3 else "NOT MET") if dtypes[0] == "bfloat16"
               else "not judged: it is for bfloat16")
    print(f"\nissue #14 target, >= 3x lm-eval's tokens/s in bfloat16 with the same numbers: {verdict} "
          f"({dtypes[0]}: {strict:.2f}x without its batch-size detection, {rows[0]['speedup_vs_lm_eval']:.2f}x with "
          f"it; numbers {'the same' if same else 'NOT the same'})")
    print(f"lmloss {ours['versions']}, lm-eval {lm['versions']}, on {ours['device_name']}; "
          f"{time.perf_counter() - started:.0f} s in all")
    if not same:
        raise SystemExit(1)


def save_json(args, *, rows, drift, info, results) -> None:
    """Everything measured so far, per-page log-likelihoods included."""
    same = all(q["same"] for r in results.values() for q in r["parity"])
    Path(args.json).write_text(json.dumps(dict(
        rows=rows, same_numbers=same, drift_from_float32=drift, model=info, results=results, rel_tol=REL_TOL,
        config={k: v for k, v in vars(args).items() if k != "worker"}, python=platform.python_version(),
        timestamp=time.time()), indent=1))


if __name__ == "__main__":
    main()
