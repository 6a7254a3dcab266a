"""The README's training loop and evaluate_bpb run as written, and the bits per byte they report is the
exact ratio: sums checked against tiktoken's own bytes and a float64 loss computed here."""
import contextlib
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    """The python block after the README's <!-- name --> marker."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README lost its <!-- {name} --> python block"
    return m.group(1)


def _gpt2():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def test_readme_training_loop_runs_and_logs_exact_bpb(assets):
    """Both blocks in order, as a reader pastes them: the loop logs every 4 steps from the meter."""
    code = _block("training-loop") + "\n" + _block("evaluate-bpb")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"step\s+(\d+)\s+loss (\S+) nats/token\s+bpb (\S+)\s+n_tokens (\d+)\s+n_bytes (\d+)", out.stdout)
    assert [int(r[0]) for r in rows] == [3, 7, 11]
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 20
    enc = _gpt2()
    ids = enc.encode(text)
    n_tokens = len(ids) - 1  # every token but the first is a target
    n_bytes = len(text.encode("utf-8")) - len(enc.decode_single_token_bytes(ids[0]))
    for _, loss, bpb, n_tokens_logged, n_bytes_logged in rows:
        assert (int(n_tokens_logged), int(n_bytes_logged)) == (4 * n_tokens, 4 * n_bytes)  # 4 steps summed
        assert float(bpb) == pytest.approx(float(loss) * n_tokens / (math.log(2) * n_bytes), rel=2e-3)
    assert float(rows[-1][2]) < 0.5 * float(rows[0][2])  # it learns
    val = re.findall(r"val bpb (\S+)", out.stdout)
    assert len(val) == 1 and 0 < float(val[0]) < 100


def test_readme_evaluate_bpb_is_exact(assets):
    """evaluate_bpb over the README's loader equals float64 nats over tiktoken's bytes of the text."""
    import lmloss

    torch.manual_seed(0)
    tok = lmloss.load_tokenizer("gpt2")
    model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, 8), torch.nn.Linear(8, tok.vocab_size))
    ns = dict(torch=torch, lmloss=lmloss, tok=tok, model=model, token_bytes=lmloss.token_byte_lengths(tok))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_block("evaluate-bpb"), ns)
    got = ns["evaluate_bpb"](model, ns["val_loader"], ns["token_bytes"])

    enc = _gpt2()
    nll_nats, n_bytes, n_scored = 0.0, 0, 0
    with torch.no_grad():
        for x, y in ns["val_loader"]:
            logits = model(x).double()  # (B, T, V)
            nll_nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            scored = y[y != -100].tolist()
            n_bytes += sum(len(enc.decode_single_token_bytes(t)) for t in scored)
            n_scored += len(scored)
    ids = enc.encode(ns["val_text"])
    assert n_scored == len(ids) - 1  # every target once, padding ignored
    assert n_bytes == len(ns["val_text"].encode("utf-8")) - len(enc.decode_single_token_bytes(ids[0]))
    assert got == pytest.approx(nll_nats / (math.log(2) * n_bytes), rel=1e-6)  # token_nll in float32
    assert printed.getvalue() == f"val bpb {got:.4f}\n"
