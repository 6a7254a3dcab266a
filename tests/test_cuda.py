"""CUDA only (deselected by `make test`; run on a GPU machine with `pytest -m cuda`): the Triton
linear kernel at the issue's vocabulary and hidden sizes, gradients on the GPU, the evaluation loop
on CUDA against the CPU, and NCCL (torchrun of scripts/eval.py, the vocabulary-parallel loss).
tests/test_ops.py and tests/test_linear.py also run their Triton cases natively on a GPU machine."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmloss
from test_linear import assert_no_worse_than_torch, make, reference_nll

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def _cuda(*xs):
    return [x.cuda() if x is not None else None for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,V", [(64, 50257), (576, 49152), (1024, 151936), (640, 262144), (1000, 5003)])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 30.0)])
def test_linear_triton_matches_float64(dtype, d, V, bias, softcap):
    hidden, weight, b, targets = make(37, d, V, dtype=dtype, bias=bias, n_ignored=5)
    h, w, bb, t = _cuda(hidden, weight, b, targets)
    before = [x.clone() for x in (h, w, t)]
    out = lmloss.linear_token_nll(h, w, t, bias=bb, softcap=softcap, impl="triton")
    assert all(torch.equal(x, y) for x, y in zip((h, w, t), before))  # inputs unchanged
    assert_no_worse_than_torch(out.cpu(), hidden, weight, targets, b, softcap)
    if dtype == torch.float32:  # full-precision products ("ieee"), not tf32
        ref = reference_nll(hidden, weight, targets, b, softcap)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=2e-5)


def test_linear_triton_many_rows_and_leading_shape():
    """Enough rows for many row blocks and few vocabulary splits; (B, T, d) hidden sliced [:, :-1]."""
    hidden, weight, _, _ = make(4 * 1025, 768, 50257, n_ignored=0)
    h3 = hidden.reshape(4, 1025, 768)[:, :-1].cuda()
    targets = torch.randint(0, 50257, (4, 1024), device="cuda")
    out = lmloss.linear_token_nll(h3, weight.cuda(), targets, impl="triton")
    ref = reference_nll(h3.cpu(), weight, targets.cpu())
    assert out.shape == (4, 1024)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 30.0)])
def test_linear_cross_entropy_gradients_on_cuda(dtype, bias, softcap):
    """The backward on CUDA: float32 products for float32, tensor-core products with float32 output
    for bf16/fp16 (rows split into several blocks by a small chunk_size)."""
    hidden, weight, b, targets = make(53, 96, 50257, dtype=dtype, bias=bias, n_ignored=7, scale=3.0)
    g = torch.rand(53, dtype=torch.float64)
    inputs = [x for x in (hidden, weight, b) if x is not None]
    leaves64 = [x.double().requires_grad_() for x in inputs]
    (reference_nll(leaves64[0], leaves64[1], targets, leaves64[2] if bias else None, softcap) * g).sum().backward()
    leaves = [x.cuda().requires_grad_() for x in inputs]
    nll = lmloss.linear_cross_entropy(leaves[0], leaves[1], targets.cuda(), bias=leaves[2] if bias else None,
                                      softcap=softcap, reduction="none", chunk_size=5000)
    (nll * g.cuda().float()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name, got, ref in zip(("hidden", "weight", "bias"), leaves, leaves64):
        assert got.grad.dtype == dtype, name
        scale = ref.grad.abs().max().item()
        err = (got.grad.cpu().double() - ref.grad).abs().max().item()
        assert err <= tol["rtol"] * scale + tol["atol"], (name, err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_nll_triton_large_vocab_gradient(dtype):
    N, V = 257, 262144
    logits = (torch.randn(N, V, device="cuda") * 10).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::11] = -100
    x = logits.clone().requires_grad_()
    out = lmloss.token_nll(x, targets, impl="triton")
    g = torch.rand(N, device="cuda")
    out.backward(g)
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, targets, reduction="none")
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    assert torch.equal(x.detach(), logits)


# ---- the evaluation loop and scripts on CUDA -----------------------------------------------------------

def test_evaluate_cuda_equals_cpu(tiny_model, assets):
    tok = lmloss.load_tokenizer(str(assets / "tokenizers" / "hf-gpt2"))
    docs = lmloss.load_corpus("wikitext", form="pages", detokenize=True, data_dir=assets / "corpora", limit=3)
    runs = {}
    for device, head in (("cpu", "fused"), ("cuda", "fused"), ("cuda", "logits")):
        model = lmloss.load_model(tiny_model, device=device, dtype="float32")
        runs[device, head] = lmloss.evaluate(model, tok, docs, plan="lm-eval", max_length=128, batch_size=5,
                                             head_impl=head, progress=False)
    cpu = runs["cpu", "fused"]
    for key, res in runs.items():
        assert res.totals.n_tokens == cpu.totals.n_tokens and res.totals.n_bytes == cpu.totals.n_bytes
        for a, b in zip(res.per_document, cpu.per_document):
            assert a.totals.nll_nats == pytest.approx(b.totals.nll_nats, rel=1e-5), key


def _eval_args(model, assets, out):
    return [str(ROOT / "scripts" / "eval.py"), "--model", model, "--tokenizer",
            str(assets / "tokenizers" / "hf-gpt2"), "--dataset", "wikitext", "--preset", "lm-eval",
            "--max-length", "128", "--limit", "4", "--batch-size", "3", "--device", "cuda",
            "--no-progress", "--bootstrap", "0", "--output", str(out)]


def test_torchrun_nccl_single_rank_equals_plain_run(tiny_model, assets, tmp_path):
    env = dict(os.environ, LMLOSS_DATA_DIR=str(assets / "corpora"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for cmd, out in (([sys.executable], "plain.json"),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"],
                      "nccl.json")):
        run = subprocess.run([*cmd, *_eval_args(tiny_model, assets, tmp_path / out)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    plain, nccl = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "nccl.json"))
    assert nccl["config"]["resolved"]["world_size"] == 1
    assert nccl["totals"]["n_tokens"] == plain["totals"]["n_tokens"]
    assert nccl["totals"]["nll_nats"] == pytest.approx(plain["totals"]["nll_nats"], rel=1e-6)


def test_vocab_parallel_on_nccl_single_rank():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        logits = torch.randn(61, 50257, device="cuda") * 10
        targets = torch.randint(0, 50257, (61,), device="cuda")
        targets[::7] = -100
        got = lmloss.vocab_parallel_token_nll(logits, targets, vocab_start=0)
        ref = F.cross_entropy(logits.double(), targets, reduction="none")
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
