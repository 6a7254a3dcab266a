"""scripts/eval.py under torchrun (gloo, 2 processes on the CPU) equals one process, and library runs
killed with SIGKILL and resumed give the totals of an uninterrupted run, bit for bit."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def _tiny_args(tiny_model, assets, out):
    return [EVAL, "--model", tiny_model, "--tokenizer", str(assets / "tokenizers" / "hf-gpt2"),
            "--dataset", "wikitext", "--preset", "lm-eval", "--max-length", "64", "--limit", "9",
            "--batch-size", "1", "--no-progress", "--bootstrap", "0", "--output", str(out)]


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


# A library-level run, killed for real (SIGKILL) at a deterministic point: right after the k-th
# document is in the checkpoint (on_document runs after the fsynced append), so no race decides
# what the file holds.
WORKER = r"""
import json, os, signal, sys
import torch
import lmloss

torch.set_num_threads(1)
model_dir, tok_dir, ckpt, out, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
docs = lmloss.load_corpus("lambada", limit=14)
done = []

def on_document(doc):
    done.append(doc.index)
    if kill_after and len(done) == kill_after and int(os.environ.get("RANK", "0")) == int(os.environ.get("KILL_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)

res = lmloss.evaluate(lmloss.load_model(model_dir, device="cpu"), lmloss.load_tokenizer(tok_dir), docs,
                      max_length=32, batch_size=3, progress=False, checkpoint=ckpt or None,
                      on_document=on_document)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump(dict(totals=res.totals.to_dict(), per_document=[d.to_dict() for d in res.per_document],
                   resumed=res.resumed_documents, world_size=res.config["world_size"]), open(out, "w"))
"""


def _worker(tmp_path, tiny_model, assets, ckpt, out, kill_after=0, nproc=1, kill_rank=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = [sys.executable] if nproc == 1 else _torchrun(nproc)
    env = dict(_env(assets), KILL_RANK=str(kill_rank))
    cmd = [*launcher, str(script), tiny_model, str(assets / "tokenizers" / "hf-gpt2"), str(ckpt), str(out),
           str(kill_after)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_library_run_killed_by_sigkill_resumes_bit_identical(tiny_model, assets, tmp_path, nproc):
    ref = _worker(tmp_path, tiny_model, assets, "", tmp_path / "ref.json", nproc=nproc)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = json.loads((tmp_path / "ref.json").read_text())
    assert want["world_size"] == nproc and len(want["per_document"]) == 14
    ckpt = tmp_path / "run.jsonl"
    for kill_after in (1, 4):
        for f in tmp_path.glob("run*.jsonl"):
            f.unlink()
        killed = _worker(tmp_path, tiny_model, assets, ckpt, tmp_path / "killed.json", kill_after, nproc,
                         kill_rank=nproc - 1)
        assert killed.returncode != 0 and not (tmp_path / "killed.json").exists()
        if nproc == 1:
            assert killed.returncode == -signal.SIGKILL
        resumed = _worker(tmp_path, tiny_model, assets, ckpt, tmp_path / "got.json", nproc=nproc)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = json.loads((tmp_path / "got.json").read_text())
        assert got["resumed"] >= kill_after
        assert got["totals"] == want["totals"] and got["per_document"] == want["per_document"]  # bit for bit
