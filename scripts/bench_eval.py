"""Evaluation speed: lmloss against lm-evaluation-harness, side by side in one run, same numbers.

    # lm-evaluation-harness in a virtual environment of its own (the CPU wheel of torch first)
    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install torch==2.13.0 \
        && /tmp/lmeval-venv/bin/pip install lm_eval gguf accelerate
    # SmolLM2 (GGUF) on the first 8 WikiText pages, max_length 1024, float32 on the CPU
    python scripts/bench_eval.py \
        --model ../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-dir ../shared/assets/corpora --lm-eval-python /tmp/lmeval-venv/bin/python
    # all 62 pages (the full lm-eval wikitext comparison), results kept
    python scripts/bench_eval.py --pages 62 --json bench.json ...
    # CUDA: a GPT-2-shaped random model at batch 32 against the HF perplexity guide's loop
    python scripts/bench_eval.py --cuda

Each side runs in its own process (lm-eval from its own virtual environment), so that peak memory
(VmHWM, reset after the model is loaded) is the evaluation's own. The floor is the model's forward
FLOPs per token over the float32 matrix-multiply rate measured in this run: the faster of torch.mm's (MKL's
sgemm on x86) and oneDNN's, the one lmloss's CPU forward uses (lmloss/ops/onednn.py). On AMD CPUs MKL runs
its AVX2 code at about half of oneDNN's rate, so a floor at torch.mm's rate would be no floor; both rates,
and the share of the floor at torch.mm's, are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TASK_YAML = """task: wikitext_lmloss_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 2.0
"""
_TASK_PY = ("from lm_eval.tasks.wikitext.preprocess_wikitext import "
            "process_results, wikitext_detokenizer  # noqa: F401\n")

# Runs in lm-eval's own environment: its wikitext task, read from the local document-level file.
_LM_EVAL_DRIVER = r"""
import json, sys, time
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
cfg = json.loads(sys.argv[1])
import torch; torch.manual_seed(0)
lm = HFLM(pretrained=cfg["folder"], gguf_file=cfg["gguf_file"], dtype="float32", device="cpu",
          max_length=cfg["max_length"], batch_size=cfg["batch_size"])
rolling, spent = lm.loglikelihood_rolling, [0.0]
def timed(*args, **kwargs):  # the scoring itself, tokenizing included, as lmloss's elapsed_s
    t = time.perf_counter()
    out = rolling(*args, **kwargs)
    spent[0] += time.perf_counter() - t
    return out
lm.loglikelihood_rolling = timed
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: peak RSS of the evaluation only
t = time.perf_counter()
out = simple_evaluate(model=lm, tasks=["wikitext_lmloss_bench"], limit=cfg["limit"], log_samples=True,
                      task_manager=TaskManager(include_path=cfg["task_dir"]), bootstrap_iters=0)
total = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
samples = sorted(out["samples"]["wikitext_lmloss_bench"], key=lambda s: s["doc_id"])
ll = [float(s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]) for s in samples]
res = out["results"]["wikitext_lmloss_bench"]
print("RESULT " + json.dumps(dict(elapsed_s=spent[0], total_s=total, peak_rss_mib=int(hwm) / 1024,
      loglikelihoods=ll, metrics={k.split(",")[0]: v for k, v in res.items() if "," in k and "stderr" not in k})))
"""


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def run_lmloss(args) -> dict:
    """One lmloss evaluation (worker process): per-document log-likelihoods, metrics, time, memory."""
    import lmloss
    from lmloss import malloc

    malloc.keep_freed_memory()  # as the `lmloss eval` process does (LMLOSS_MALLOC=default: glibc's own)
    model = lmloss.load_model(args.model, device="cpu", dtype="float32")
    tok = lmloss.load_tokenizer(args.model)
    docs = lmloss.load_corpus("wikitext", form="pages", detokenize=True, data_dir=args.data_dir,
                              limit=args.pages)
    lmloss.evaluate(model, tok, docs[:1], max_length=64, batch_size=1, progress=False)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    res = lmloss.evaluate(model, tok, docs, plan="lm-eval", max_length=args.max_length,
                          batch_size=args.batch_size, progress=False)
    return dict(elapsed_s=res.elapsed_s, peak_rss_mib=_peak_rss_mib(), n_tokens=res.totals.n_tokens,
                n_inputs=sum(w.n_inputs for w in res.windows),
                loglikelihoods=[-d.totals.nll_nats for d in res.per_document], metrics=res.metrics(),
                notes=res.notes, malloc=malloc.mode(),
                flops_per_token=_flops_per_token(model.module, args.max_length))


def run_lm_eval(args, workdir: Path) -> dict:
    """lm-evaluation-harness's own wikitext task on the same pages, in its own environment."""
    data_file = Path(args.data_dir).resolve() / "wikitext-2-raw-v1" / "test.document_level.jsonl"
    task_dir = workdir / "tasks"
    task_dir.mkdir()
    (task_dir / "wikitext_lmloss_bench.yaml").write_text(_TASK_YAML.format(data_file=data_file))
    (task_dir / "preprocess_wikitext.py").write_text(_TASK_PY)
    gguf = Path(args.model).resolve()
    cfg = dict(folder=str(gguf.parent), gguf_file=gguf.name, max_length=args.max_length,
               batch_size=args.lm_eval_batch_size, limit=args.pages, task_dir=str(task_dir))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / "hf_datasets"))
    if args.lm_eval_malloc == "keep":  # the same allocator settings as lmloss's process (lmloss/malloc.py)
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    proc = subprocess.run([args.lm_eval_python, "-c", _LM_EVAL_DRIVER, json.dumps(cfg)], env=env,
                          capture_output=True, text=True, cwd=workdir)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"lm-eval run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def _lm_eval_cached(args, workdir: Path) -> dict:
    """lm-eval's result, read from --lm-eval-cache when that file holds a run with these settings
    (its numbers do not depend on lmloss's code), else run and, with --lm-eval-cache, saved there."""
    key = dict(model=str(Path(args.model).resolve()), pages=args.pages, max_length=args.max_length,
               batch_size=args.lm_eval_batch_size, malloc=args.lm_eval_malloc)
    cache = Path(args.lm_eval_cache) if args.lm_eval_cache else None
    if cache and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            print(f"lm-eval result read from {cache} (its time and memory are from that run)")
            return saved["result"]
    result = run_lm_eval(args, workdir)
    if cache:
        cache.write_text(json.dumps(dict(key=key, result=result)))
    return result


def _flops_per_token(module, context: int) -> float:
    """Forward FLOPs per token: 2 x (non-embedding weights + output head) + attention scores and
    values at the mean causal context (context / 2)."""
    import torch

    cfg = module.config
    n_embed = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Embedding)
                  for p in m.parameters())
    head = module.get_output_embeddings().weight.numel()
    tied = module.get_output_embeddings().weight is module.get_input_embeddings().weight
    n_params = sum(p.numel() for p in module.parameters())
    body = n_params - n_embed + (0 if tied else -head)
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return 2.0 * (body + head) + 2.0 * 2 * layers * d * (context / 2)


def matmul_gflops(*, n: int = 1024, reps: int = 10, device: str = "cpu", library: str = "torch") -> float:
    """float32 matrix-multiply rate: best of `reps` (n x n) @ (n x n) products, in GFLOP/s.
    library "torch": torch.mm (MKL's sgemm on x86 CPUs); "onednn": the oneDNN product lmloss's CPU linear
    layers use (lmloss/ops/onednn.py), NaN where it is not available."""
    import torch

    from lmloss.ops import onednn

    a, b, c = (torch.randn(n, n, device=device) for _ in range(3))
    if library == "onednn":
        if device != "cpu" or not onednn.available():
            return math.nan
        bt = b.T.contiguous()

        def product():
            onednn.linear(a, bt)
    else:
        def product():
            torch.mm(a, b, out=c)  # into memory already mapped: the product's own rate
    best = math.inf
    for _ in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        product()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _matmul_rates() -> dict:
    """Both float32 GEMM libraries' rates on this CPU (torch.mm, and oneDNN where lmloss uses it)."""
    return dict(torch_mm=matmul_gflops(), onednn=matmul_gflops(library="onednn"))


def bench_gpu(*, n_tokens: int = 65536, batch_size: int = 32, device: str = "cuda") -> list[dict]:
    """GPT-2-shaped random model, windows of 1024 moving by 512 over one stream of random ids:
    lmloss at `batch_size` against the HF perplexity guide's loop (batch 1, labels= loss)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import lmloss

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch.manual_seed(0)
    module = GPT2LMHeadModel(GPT2Config()).to(device).eval()
    ids = torch.randint(0, 50257, (n_tokens,)).tolist()

    class _Tok:  # random ids, no text
        name, bos_id, eos_id = "random", 50256, 50256

        def encode(self, text):
            return ids

    class _Doc:
        text, name, n_bytes, n_words, n_chars = "", "random", 1, 1, 1

    rows = []
    for dtype in ("float32", "bfloat16"):
        model = lmloss.load_model(module, device=device, dtype=dtype)
        ours = {}
        for head in ("fused", "logits"):
            run = lambda: lmloss.evaluate(model, _Tok(), [_Doc()], plan="sliding", max_length=1024,  # noqa: E731
                                          stride=512, batch_size=batch_size, head_impl=head, progress=False)
            run()  # warm-up
            sync()
            ours[head] = run()
        sync()
        t = time.perf_counter()
        nll_sum, count, prev_end, seq = 0.0, 0, 0, torch.tensor([ids], device=device)
        with torch.inference_mode():
            for begin in range(0, n_tokens, 512):
                end = min(begin + 1024, n_tokens)
                labels = seq[:, begin:end].clone()
                labels[:, :-(end - prev_end)] = -100
                loss = model.module(seq[:, begin:end], labels=labels).loss
                n = int((labels[:, 1:] != -100).sum())
                nll_sum, count, prev_end = nll_sum + loss.float().item() * n, count + n, end
                if end == n_tokens:
                    break
        sync()
        hf_s = time.perf_counter() - t
        name = torch.cuda.get_device_name() if device.startswith("cuda") else device
        for head, res in ours.items():
            rows.append(dict(device=name, dtype=dtype, batch_size=batch_size, head_impl=head,
                             n_tokens=res.totals.n_tokens, hf_n_tokens=count,
                             lmloss_tokens_per_s=round(res.tokens_per_s), hf_loop_tokens_per_s=round(count / hf_s),
                             speedup=round(res.tokens_per_s / (count / hf_s), 2),
                             lmloss_nll_per_token=res.totals.nll_per_token, hf_nll_per_token=nll_sum / count))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("LMLOSS_MODEL"), help="GGUF file of the model")
    p.add_argument("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR"), help="offline corpora folder")
    p.add_argument("--pages", type=int, default=8, help="first N WikiText pages (62: all)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2, help="lmloss windows per forward pass "
                   "(2: scripts/eval.py's CPU default)")
    p.add_argument("--lm-eval-batch-size", type=int, default=1)
    p.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python",
                   help="python of a virtual environment with lm_eval installed")
    p.add_argument("--lm-eval-malloc", choices=("default", "keep"), default="default",
                   help="lm-eval's allocator: glibc's defaults (what its users get) or freed memory kept "
                   "mapped, as lmloss's own process keeps it (lmloss/malloc.py)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--lm-eval-cache", help="reuse lm-eval's result from this file when its settings match; "
                   "else run lm-eval and save it there (timings are then not side by side)")
    p.add_argument("--lm-eval-only", action="store_true", help="only run lm-eval (into --lm-eval-cache)")
    p.add_argument("--cuda", action="store_true", help="only the CUDA section")
    p.add_argument("--cuda-tokens", type=int, default=65536)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_lmloss(args)))
        return
    import torch

    import lmloss

    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: the CUDA section needs one")
        for row in bench_gpu(n_tokens=args.cuda_tokens):
            print(json.dumps(row))
        return
    if not args.model or not args.data_dir:
        raise SystemExit("pass --model (a GGUF file) and --data-dir (or set LMLOSS_MODEL / LMLOSS_DATA_DIR)")
    if args.lm_eval_only:
        if not args.lm_eval_cache:
            raise SystemExit("--lm-eval-only needs --lm-eval-cache FILE to save the result in")
        with tempfile.TemporaryDirectory() as tmp:
            res = _lm_eval_cached(args, Path(tmp))
        print(f"lm-eval: {len(res['loglikelihoods'])} documents in {res['elapsed_s']:.0f} s -> {args.lm_eval_cache}")
        return
    rates = _matmul_rates()
    with tempfile.TemporaryDirectory() as tmp:
        worker = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]],
                                capture_output=True, text=True)
        line = [x for x in worker.stdout.splitlines() if x.startswith("RESULT ")]
        if worker.returncode != 0 or not line:
            raise SystemExit(f"lmloss run failed (exit {worker.returncode}):\n{worker.stderr[-4000:]}")
        ours = json.loads(line[-1][len("RESULT "):])
        theirs = _lm_eval_cached(args, Path(tmp))
    rates = {k: max(v, w) for (k, v), w in zip(rates.items(), _matmul_rates().values())}  # before and after: shared machine
    # The floor is at the machine's fastest float32 GEMM: torch.mm's MKL runs its AVX2 code on AMD CPUs, at
    # about half of oneDNN's rate there (lmloss/ops/onednn.py), so a floor at torch.mm's rate would be no floor.
    gflops = max(r for r in rates.values() if not math.isnan(r))
    print(f"float32 GEMM, 1024 x 1024 @ 1024 x 1024: torch.mm {rates['torch_mm']:.0f} GFLOP/s, oneDNN "
          f"{rates['onednn']:.0f} GFLOP/s; the floor below is at {gflops:.0f}")
    # 1. Check: the same numbers, document by document, before any time is reported.
    rel = [abs(a - b) / abs(b) for a, b in zip(ours["loglikelihoods"], theirs["loglikelihoods"])]
    max_rel = max(rel) if rel else math.nan
    same = len(rel) == len(theirs["loglikelihoods"]) and max_rel <= 1e-4
    print(f"{'All per-document log-likelihoods match' if same else 'MISMATCH'}: {len(rel)} documents, "
          f"max relative difference {max_rel:.2e}")
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"  {name:16s} lmloss {ours['metrics'][name]:.6f}   lm-eval {theirs['metrics'][name]:.6f}")
    # 2. Time and memory.
    n = ours["n_tokens"]
    floor = gflops * 1e9 / ours["flops_per_token"]
    rows = [dict(impl=impl, n_tokens=n, elapsed_s=r["elapsed_s"], tokens_per_s=n / r["elapsed_s"],
                 peak_rss_mib=r["peak_rss_mib"]) for impl, r in (("lmloss", ours), ("lm-eval", theirs))]
    print(f"\n{'impl':8s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MiB':>13s}")
    for r in rows:
        print(f"{r['impl']:8s} {r['n_tokens']:8d} {r['elapsed_s']:8.1f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_mib']:13.0f}")
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\nlmloss / lm-eval tokens/s: {speedup:.2f}x (lmloss's allocator: {ours.get('malloc', '?')}; "
          f"lm-eval's: {args.lm_eval_malloc})")
    print(f"floor: {ours['flops_per_token'] / 1e6:.0f} MFLOP/token at {gflops:.0f} GFLOP/s (fp32 matmul, "
          f"measured now) = {floor:.0f} tokens/s; lmloss reaches {rows[0]['tokens_per_s'] / floor:.0%} of it, "
          f"lm-eval {rows[1]['tokens_per_s'] / floor:.0%}")
    if rates["torch_mm"] < gflops:
        mm_floor = rates["torch_mm"] * 1e9 / ours["flops_per_token"] * n / ours.get("n_inputs", n)
        print(f"(at torch.mm's {rates['torch_mm']:.0f} GFLOP/s the plan floor would be {mm_floor:.0f} scored tokens/s: "
              f"lmloss {rows[0]['tokens_per_s'] / mm_floor:.0%} of it, lm-eval {rows[1]['tokens_per_s'] / mm_floor:.0%})")
    if ours.get("n_inputs"):  # the plan feeds each document's last window up to max_length - 1 context tokens
        plan_floor = floor * n / ours["n_inputs"]
        print(f"the plan feeds {ours['n_inputs']} model inputs for {n} scored tokens (both tools must): "
              f"floor {plan_floor:.0f} scored tokens/s; lmloss reaches {rows[0]['tokens_per_s'] / plan_floor:.0%}, "
              f"lm-eval {rows[1]['tokens_per_s'] / plan_floor:.0%}; 1.5x lm-eval would be "
              f"{1.5 * rows[1]['tokens_per_s'] / plan_floor:.0%} of it")
    if args.json:
        out = dict(rows=rows, speedup=speedup, matmul_gflops=gflops, matmul_rates=rates, floor_tokens_per_s=floor,
                   max_rel_diff=max_rel, same_numbers=same, lmloss=ours, lm_eval=theirs,
                   config=vars(args), versions=dict(lmloss=lmloss.__version__, torch=torch.__version__,
                                                    python=platform.python_version()),
                   machine=f"{platform.machine()} {os.cpu_count()} cores", timestamp=time.time())
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
