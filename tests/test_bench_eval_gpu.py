"""scripts/bench_eval_gpu.py: its parity rule, the reason for its bfloat16 tolerance, and its lmloss side
against lm-evaluation-harness's rolling windows written out here in float64. lm-eval itself is not
installed in this environment; with LMLOSS_LM_EVAL_PYTHON set to a python that imports lm_eval 0.4.13,
the slow test runs the whole script at tiny size on the CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_eval_gpu.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_eval_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_script()


# -- the parity rule ------------------------------------------------------------------------------

def test_compare_identical_pages_match_with_exact_sums():
    ll = [-13283.808, -57159.14, -0.5]
    q = bench.compare(ll, list(ll), rel_tol=1e-4)
    assert q["same"] and q["max_rel_diff"] == 0.0 and q["n_documents"] == 3
    assert q["sum_ours"] == q["sum_theirs"] == math.fsum(ll)


def test_compare_is_relative_per_page_and_names_the_worst_page():
    theirs = [-1000.0, -20000.0, -300.0]
    # page 1 is off by 1.5 nats: 7.5e-5 relative, below 1e-4; page 2 by 0.05: 1.67e-4, above it
    ours = [-1000.0, -20001.5, -300.05]
    q = bench.compare(ours, theirs, rel_tol=1e-4)
    assert not q["same"] and q["worst_document"] == 2
    assert q["max_rel_diff"] == pytest.approx(0.05 / 300)
    assert bench.compare(ours[:2], theirs[:2], rel_tol=1e-4)["same"]
    # at the tolerance exactly: still the same
    assert bench.compare([-1.0 - 2.0**-8], [-1.0], rel_tol=2.0**-8)["same"]


@pytest.mark.parametrize("ours, theirs, why", [
    ([-1.0, -2.0], [-1.0], "2 documents against 1"),
    ([-1.0, math.nan], [-1.0, -2.0], "non-finite"),
    ([-1.0, -2.0], [-1.0, -math.inf], "non-finite"),
])
def test_compare_refuses_what_cannot_be_the_same_numbers(ours, theirs, why):
    q = bench.compare(ours, theirs, rel_tol=math.inf)
    assert not q["same"] and why in q["why"]


# -- why the bfloat16 tolerance is 2^-7 --------------------------------------------------------------

def test_bf16_window_sums_lm_eval_rounds_stay_within_half_the_tolerance():
    """lm-eval returns each window's summed log-probabilities in bfloat16 (8 significant bits): a page's
    sum then moves by up to 2^-8 relative, and often by more than 2^-9, so the parity for bfloat16 is
    2^-7 (this rounding and the one of each log-probability before it) and not float32's 1e-4."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        windows = -(1000 + 20000 * torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g,
                                              dtype=torch.float64))  # 1024-token windows: ~1e3-2e4 nats
        exact = windows.sum().item()
        rounded = math.fsum(windows.to(torch.bfloat16).double().tolist())
        worst = max(worst, abs(rounded - exact) / abs(exact))
    assert 2.0**-9 < worst <= 2.0**-8 == bench.REL_TOL["bfloat16"] / 2


# -- the lmloss side against lm-eval's windows, float64 ----------------------------------------------

def _lm_eval_rolling_ll(module, ids: list[int], *, prefix: int, max_length: int, full_context: bool = True) -> float:
    """lm-eval 0.4.13's loglikelihood_rolling of one document, in float64: the first window feeds
    [prefix] + ids[:L-1] and scores ids[:L]; each later one scores the next (up to L) tokens from the
    L tokens just before its last one. full_context=False feeds a last, shorter window only the tokens
    just before its own (a plain disjoint split: the same tokens scored, less context for some)."""
    total, start, n, L = 0.0, 0, len(ids), max_length
    with torch.no_grad():
        while start < n:
            end = min(start + L, n)
            if start == 0:
                inputs = [prefix] + ids[:end - 1]
            else:
                inputs = ids[end - 1 - L:end - 1] if full_context else ids[start - 1:end - 1]
            logp = module(torch.tensor([inputs])).logits[0].log_softmax(-1)  # (len(inputs), V) float64
            targets = torch.tensor(ids[start:end])
            total += logp[len(inputs) - len(targets):].gather(1, targets[:, None]).sum().item()
            start = end
    return total


@pytest.fixture(scope="module")
def built(tmp_path_factory, assets):
    folder = tmp_path_factory.mktemp("bench-eval-gpu") / "model"
    info = bench.build_model(folder, size="tiny", seed=0, init_std=0.05,
                             tokenizer_dir=assets / "tokenizers" / "hf-gpt2")
    return folder, info


def test_build_model_is_seeded_and_carries_the_tokenizer(built, tmp_path, assets):
    from safetensors.torch import load_file

    folder, info = built
    assert info["context"] == bench.SIZES["tiny"]["n_positions"] and (folder / "tokenizer.json").is_file()
    again = bench.build_model(tmp_path / "again", size="tiny", seed=0, init_std=0.05,
                              tokenizer_dir=assets / "tokenizers" / "hf-gpt2")
    a, b = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert again == info and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="tokenizer-dir"):
        bench.build_model(tmp_path / "none", size="tiny", seed=0, init_std=0.05, tokenizer_dir=tmp_path)


def test_lmloss_side_matches_lm_eval_windows_in_float64(built, assets, one_thread):
    """The numbers the script compares with lm-eval are lm-eval's definition: per page, lmloss (float32,
    the script's worker) against lm-eval's rolling windows written out here in float64; and a window
    whose last window has less context (same tokens scored) moves the page by far more than the
    float32 tolerance: the parity can tell the two apart."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from lmloss import load_corpus

    folder, info = built
    data_dir = assets / "corpora"
    cfg = dict(folder=str(folder), device="cpu", dtype="float32", data_dir=str(data_dir), pages=1,
               max_length=info["context"], batch_sizes=[None], repeats=2)
    out = bench.run_lmloss(cfg)
    tok = AutoTokenizer.from_pretrained(folder)
    page = load_corpus("wikitext", form="pages", detokenize=True, data_dir=str(data_dir), limit=1)[0]
    ids = tok(page.text)["input_ids"]
    module = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64).eval()
    want = _lm_eval_rolling_ll(module, ids, prefix=tok.eos_token_id, max_length=info["context"])
    short = _lm_eval_rolling_ll(module, ids, prefix=tok.eos_token_id, max_length=info["context"], full_context=False)
    assert [r["batch_size"] for r in out["runs"]] == [2]  # lmloss's own default on the CPU
    for run in out["runs"]:
        assert run["n_tokens"] == len(ids) and run["nll_nats"] == -run["loglikelihoods"][0]
        assert bench.compare(run["loglikelihoods"], [want], rel_tol=1e-6)["same"]
        assert run["n_bytes"] == page.n_bytes and run["elapsed_s"] > 0
        assert len(run["runs_s"]) == 2 and run["elapsed_s"] in run["runs_s"] and run["repeats_identical"]
    assert len(ids) % info["context"] and abs(short - want) / abs(want) > 10 * bench.REL_TOL["float32"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LMLOSS_LM_EVAL_PYTHON"),
                    reason="set LMLOSS_LM_EVAL_PYTHON to a python with lm_eval 0.4.13 installed")
def test_whole_script_against_lm_eval_at_tiny_size(assets, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, LMLOSS_ASSETS=str(assets))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--pages", "1",
                           "--dtypes", "float32", "--lm-eval-max-batch-size", "4", "--lm-eval-python",
                           os.environ["LMLOSS_LM_EVAL_PYTHON"], "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    lm = res["results"]["float32"]["lm_eval"]
    assert res["same_numbers"] and lm["mode"] == "task" and lm["batch_size"] == 4
    assert lm["n_tokens"] == res["results"]["float32"]["lmloss"]["runs"][0]["n_tokens"]
    for run in (lm, *res["results"]["float32"]["lmloss"]["runs"]):  # --repeats 3: the median of three
        assert sorted(run["runs_s"])[1] == run["elapsed_s"] and run["repeats_identical"]
    assert "All 1 per-document log-likelihoods match" in proc.stdout
