#!/usr/bin/env bash
# Every CUDA check and benchmark of lmloss in one run, for a GPU machine that is lent briefly.
#
#   bash scripts/gpu_check.sh            # logs and JSON rows under $OUT (default /tmp/lmloss-gpu)
#
# Offline assets: $LMLOSS_ASSETS (default .devassets: corpora/wikitext-2-raw-v1 and tokenizers/hf-gpt2
# copied from the shared assets). Optional wheels in .whl/ (cut-cross-entropy, liger-kernel; for eval_e2e lm_eval
# 0.4.13 and its needs, listed in scripts/bench_eval_gpu.py) are installed into /tmp/site first. To prepare both
# beside a checkout with ../shared (ignored by git):
#   mkdir -p .devassets/corpora .devassets/tokenizers && cp -r ../shared/assets/corpora/wikitext-2-raw-v1 \
#       .devassets/corpora/ && cp -r ../shared/assets/tokenizers/hf-gpt2 .devassets/tokenizers/
#   pip download --no-deps --only-binary=:all: -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
#   printf '/.devassets/\n/.whl/\n' >> .git/info/exclude
# Sections run in order of importance, each under its own time limit and all under GPU_CHECK_BUDGET_S
# (default 420 s, so that the whole run, with installs, fits a 15-minute lease), so a slow one cannot
# starve the rest of its log. First the fused linear cross-entropy's Triton backward: its CUDA tests, the
# bf16 forward+backward benchmark (lmloss vs torch.compile vs CCE vs Liger at V=50257 and 262144, with
# peak memory beyond the gradients as a share of the logits), its tile sweep; then everything else.
# GPU_CHECK_SECTIONS="tests linear_bf16" runs only those; GPU_CHECK_NO_COMPILE=1 leaves out torch.compile;
# GPU_CHECK_EVAL_ARGS replaces eval_e2e's options (default "--batch-sizes default,64"); GPU_CHECK_TESTS_K replaces
# linear_tests' -k filter (default "linear").
set -u
OUT=${OUT:-/tmp/lmloss-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LMLOSS_ASSETS=${LMLOSS_ASSETS:-$PWD/.devassets}
export LMLOSS_DATA_DIR=$LMLOSS_ASSETS/corpora HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-420} ))

section() {  # section NAME MAX_SECONDS COMMAND...: output to the terminal and $OUT/NAME.log
    local name=$1 cap=$2 left
    shift 2
    if [[ -n "${GPU_CHECK_SECTIONS:-}" && " $GPU_CHECK_SECTIONS " != *" $name "* ]]; then return; fi
    left=$(( deadline - $(date +%s) ))
    if (( left < 15 )); then echo "=== $name: skipped, budget spent"; return; fi
    (( cap > left )) && cap=$left
    echo "=== $name (limit ${cap}s) $(date +%T)"
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL_LINES:-25}" "$OUT/$name.log"
    echo "=== $name rc=$rc $(date +%T)"
}

section env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv;
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
    torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")";
    python3 -c "import cut_cross_entropy, liger_kernel; print(\"cce and liger importable\")"'
TAIL_LINES=30 section linear_tests 200 python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_linear.py \
    tests/test_cuda.py -k "${GPU_CHECK_TESTS_K:-linear}"
TAIL_LINES=40 section linear_bf16 180 python3 scripts/bench_linear_nll.py --device cuda --dtype bfloat16 --modes fwd fwd+bwd \
    --methods lmloss "lmloss (atomic bwd)" "torch.compile(mm+F.ce)" cce liger ${GPU_CHECK_NO_COMPILE:+--no-compile}
# The chunked backward's chunk width: GPU time against the host's time per call, and forward+backward against
# torch.compile, at N=8192 (V=50257, 262144) and N=2048 (V=50257, no torch.compile)
TAIL_LINES=40 section linear_chunks 170 bash -c "python3 scripts/bench_linear_chunks.py ${GPU_CHECK_NO_COMPILE:+--no-compile} &&
    python3 scripts/bench_linear_chunks.py --N 2048 --vocab 50257 --divisors 32 20 8 4 --no-compile"
# The backward's parts at N=8192 (dz kernels, dW's and dh's products) and a profile of its kernels
TAIL_LINES=40 section linear_parts 120 python3 scripts/bench_linear_chunks.py --divisors 16 --parts \
    ${GPU_CHECK_NO_COMPILE:+--no-compile}
# The chunked backward's dz kernel in each of its forms (linear_triton_chunks.DZ_KERNELS), side by side; only when named
if [[ " ${GPU_CHECK_SECTIONS:-} " == *" linear_forms "* ]]; then
    TAIL_LINES=40 section linear_forms 150 python3 scripts/bench_linear_chunks.py --dz-kernels tiles clamped persistent \
        --divisors 16 ${GPU_CHECK_NO_COMPILE:+--no-compile}
fi
# The forward kernel's tiles (bf16 only; the full tune section below also sweeps float32 and token_nll); only
# when named in GPU_CHECK_SECTIONS
if [[ " ${GPU_CHECK_SECTIONS:-} " == *" tune_linear "* ]]; then
    TAIL_LINES=20 section tune_linear 90 python3 scripts/tune_triton.py --kernels linear --dtypes bfloat16
fi
TAIL_LINES=20 section kl_stats_tests 90 python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_kl.py \
    tests/test_token_stats.py
TAIL_LINES=20 section linear_bwd_tiles 60 python3 scripts/bench_linear_nll.py --device cuda --dtype bfloat16 \
    --sweep-backward --vocab 50257
# Issue #14 item 4: lmloss against lm-eval's HFLM (bf16, batch_size auto) end to end, GPT-2-small-shaped random
# model built on the card, all 62 WikiText-2 pages; bf16 timed, then fp32 parity. Needs lm_eval and its needs in
# .whl/ (scripts/bench_eval_gpu.py's docstring says how). About 2-3 minutes on an H100 (estimated).
TAIL_LINES=45 section eval_e2e 300 python3 scripts/bench_eval_gpu.py ${GPU_CHECK_EVAL_ARGS:---batch-sizes default,64} \
    --json "$OUT/eval_e2e.json"
# The chunked backward's dz-kernel tiles and chunk widths (lmloss/ops/linear_triton_chunks.py's defaults come from here).
TAIL_LINES=20 section linear_chunk_tiles 75 python3 scripts/bench_linear_nll.py --device cuda --dtype bfloat16 \
    --sweep-backward chunks
TAIL_LINES=40 section tests 150 python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_cuda.py \
    tests/test_ops.py -k "not linear"
TAIL_LINES=40 section tests_triton_ops 90 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_ops.py \
    -k "triton and not interpreter"
section eval_gpt2 90 python3 scripts/bench_eval.py --cuda --cuda-tokens 131072
section linear_fp32 100 python3 scripts/bench_linear_nll.py --device cuda --dtype float32 --no-compile
section token_nll 90 python3 scripts/bench_token_nll.py --device cuda --no-compile \
    --shapes 8192x50257,4096x128256,2048x262144
TAIL_LINES=45 section tune 120 python3 scripts/tune_triton.py
echo "done $(date +%T)"
