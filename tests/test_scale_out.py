"""scripts/eval.py under torchrun (gloo, 2 processes on the CPU) and killed-then-resumed runs give
the totals of one uninterrupted process."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL = str(ROOT / "scripts" / "eval.py")
SMOLLM2 = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"


def _env(assets):
    return dict(os.environ, OMP_NUM_THREADS="1", LMLOSS_DATA_DIR=str(assets / "corpora"),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(cmd, env, timeout=600):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _same_results(a: dict, b: dict, rel: float):
    assert a["totals"]["n_tokens"] == b["totals"]["n_tokens"]
    for k in ("n_bytes", "n_words", "n_chars"):
        assert a["totals"][k] == b["totals"][k]
    assert a["totals"]["nll_nats"] == pytest.approx(b["totals"]["nll_nats"], rel=rel)
    assert [r["index"] for r in a["documents"]] == [r["index"] for r in b["documents"]]
    for ra, rb in zip(a["documents"], b["documents"]):
        assert ra["n_tokens"] == rb["n_tokens"] and ra["n_bytes"] == rb["n_bytes"]
        assert ra["nll_nats"] == pytest.approx(rb["nll_nats"], rel=rel)


def _tiny_args(tiny_model, assets, out, batch_size=1):
    return [EVAL, "--model", tiny_model, "--tokenizer", str(assets / "tokenizers" / "hf-gpt2"),
            "--dataset", "wikitext", "--preset", "lm-eval", "--max-length", "64", "--limit", "9",
            "--batch-size", str(batch_size), "--no-progress", "--bootstrap", "0", "--output", str(out)]


def test_torchrun_two_processes_equal_one(tiny_model, assets, tmp_path):
    env = _env(assets)
    _run([sys.executable, *_tiny_args(tiny_model, assets, tmp_path / "one.json")], env)
    _run([*_torchrun(2), *_tiny_args(tiny_model, assets, tmp_path / "two.json")], env)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["config"]["resolved"]["world_size"] == 2
    _same_results(two, one, rel=1e-9)
    assert not list(tmp_path.glob("*.partial*"))  # checkpoints removed once results are written


@pytest.mark.slow
def test_torchrun_smollm2_equals_single_process(assets, tmp_path):
    env = _env(assets)
    args = [EVAL, "--model", str(assets / SMOLLM2), "--dataset", "wikitext", "--preset", "lm-eval",
            "--max-length", "256", "--limit", "3", "--batch-size", "2", "--no-progress", "--bootstrap", "0"]
    _run([sys.executable, *args, "--output", str(tmp_path / "one.json")], env, timeout=900)
    _run([*_torchrun(2), *args, "--output", str(tmp_path / "two.json")], env, timeout=900)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    _same_results(two, one, rel=1e-9)


def _kill_when(proc, ckpt: Path, n_rows: int, deadline_s: float = 300):
    """SIGKILL proc once its checkpoint holds n_rows finished documents (or it has ended)."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < deadline_s:
        if ckpt.exists() and ckpt.read_bytes().count(b"\n") - 1 >= n_rows:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()


def test_killed_and_resumed_runs_give_identical_totals(tiny_model, assets, tmp_path):
    """Batches of 3 windows: re-scored documents keep the batch neighbours of the uninterrupted run."""
    env = _env(assets)
    _run([sys.executable, *_tiny_args(tiny_model, assets, tmp_path / "ref.json", 3)], env)
    ref = json.loads((tmp_path / "ref.json").read_text())
    rnd = random.Random(7)
    killed = 0
    for trial in range(5):
        out = tmp_path / f"r{trial}.json"
        ckpt = out.with_name(out.name + ".partial.jsonl")
        proc = subprocess.Popen([sys.executable, *_tiny_args(tiny_model, assets, out, 3)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, ckpt, rnd.randint(1, 8))
        killed += proc.returncode == -signal.SIGKILL
        assert not out.exists() or proc.returncode == 0  # no half-written results file
        if proc.returncode == -signal.SIGKILL:
            with open(ckpt, "ab") as f:  # as if the kill tore a line mid-write
                f.write(b'{"index": 8, "nll_na')
        _run([sys.executable, *_tiny_args(tiny_model, assets, out, 3), "--resume"], env)
        got = json.loads(out.read_text())
        assert got["totals"] == ref["totals"]  # bit-identical float64 sums
        assert got["documents"] == ref["documents"]
        assert not ckpt.exists()
    assert killed >= 3  # the kills really landed mid-run


def test_resume_refuses_another_configuration(tiny_model, assets, tmp_path):
    env = _env(assets)
    out = tmp_path / "r.json"
    ckpt = out.with_name(out.name + ".partial.jsonl")
    proc = subprocess.Popen([sys.executable, *_tiny_args(tiny_model, assets, out)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, ckpt, 2)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    args = _tiny_args(tiny_model, assets, out)
    args[args.index("64")] = "32"  # --max-length 64 -> 32
    res = subprocess.run([sys.executable, *args, "--resume"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert "another configuration" in res.stderr and "max_length: checkpoint has 64, this run has 32" in res.stderr
    assert "Traceback" not in res.stderr
