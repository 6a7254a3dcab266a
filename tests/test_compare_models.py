"""lmloss.compare and `lmloss compare-models`: KL divergence against a float64 loop written here,
the paired bootstrap against a hand computation with the same draws, the shared-vocabulary checks,
and the command's outputs and errors (all before any model loads)."""
import copy
import dataclasses
import importlib
import json
import math
import random
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmloss.data import Document
from lmloss.evaluate import evaluate
from lmloss.results import DocumentResult, bootstrap_ci
from lmloss.metrics import LossTotals
from lmloss.models import load_model
from lmloss.windows import plan_windows

cmp = importlib.import_module("lmloss.compare")  # the module, even where lmloss.compare is the function
cli = importlib.import_module("lmloss.cli_compare_models")

VOCAB, BOS, EOS = 259, 256, 257

pytestmark = pytest.mark.usefixtures("one_thread")


def _token_kl64(ref_logits, logits, targets=None, *, ignore_index=-100, impl="auto"):
    """Stand-in for lmloss.ops.kl.token_kl (its contract), in float64, until that module exists."""
    lr, lp = (torch.log_softmax(x.double(), -1) for x in (ref_logits, logits))
    kl = (lr.exp() * (lr - lp)).sum(-1)
    nll_ref = -lr.gather(-1, targets[..., None])[..., 0]
    nll = -lp.gather(-1, targets[..., None])[..., 0]
    return types.SimpleNamespace(kl=kl.float(), nll_ref=nll_ref.float(), nll=nll.float(),
                                 argmax_ref=ref_logits.argmax(-1), argmax=logits.argmax(-1))


@pytest.fixture(scope="module", autouse=True)
def _kl_op():
    """The real lmloss.ops.kl when it is there, else the float64 stand-in above."""
    try:
        importlib.import_module("lmloss.ops.kl")
        yield
    except ImportError:
        sys.modules["lmloss.ops.kl"] = types.SimpleNamespace(token_kl=_token_kl64)
        yield
        del sys.modules["lmloss.ops.kl"]


class ByteTokenizer:
    """Token ids are UTF-8 bytes; 256 is BOS, 257 EOS."""

    name, vocab_size, bos_id, eos_id = "bytes", VOCAB, BOS, EOS

    def encode(self, text):
        return list(text.encode("utf-8"))


def _gpt2(seed, vocab=VOCAB, init=0.2, n_positions=64):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                     initializer_range=init)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def models():
    """Two byte-vocabulary models: a reference, and the reference with its weights perturbed."""
    ref = _gpt2(0)
    other = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref, other


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "é", "on", "mat", "\n", "naïve", "42"]
    return [Document(" ".join(rng.choice(words) for _ in range(n)), name=f"d{i}")
            for i, n in enumerate([0, 1, 5, 12, 30, 3, 21])]


def _reference_kl(ref_module, module, tokens, windows):
    """Per document, in float64 (the models copied to float64, each window on its own, unpadded):
    the KL at every scored position, both NLL sums, top-1 agreements and delta_p sums."""
    ref64, mod64 = copy.deepcopy(ref_module).double(), copy.deepcopy(module).double()
    out = {}
    for w in windows:
        inputs = torch.tensor([w.inputs(tokens[w.doc])])
        with torch.no_grad():
            lr = torch.log_softmax(ref64(input_ids=inputs).logits[0], -1)[w.n_inputs - w.n_scored:]
            lp = torch.log_softmax(mod64(input_ids=inputs).logits[0], -1)[w.n_inputs - w.n_scored:]
        t = torch.tensor(tokens[w.doc][w.scored.start:w.scored.stop])
        pr, pp = lr.gather(1, t[:, None])[:, 0].exp(), lp.gather(1, t[:, None])[:, 0].exp()
        d = out.setdefault(w.doc, dict(kl=[], nll_ref=0.0, nll=0.0, same=0, dp=0.0, dp2=0.0))
        d["kl"] += (lr.exp() * (lr - lp)).sum(-1).tolist()
        d["nll_ref"] -= pr.log().sum().item()
        d["nll"] -= pp.log().sum().item()
        d["same"] += int((lr.argmax(-1) == lp.argmax(-1)).sum())
        d["dp"] += (pp - pr).sum().item()
        d["dp2"] += ((pp - pr) ** 2).sum().item()
    return out


# -- KL divergence -----------------------------------------------------------------------------------

class ExactByteTokenizer(ByteTokenizer):
    """With byte lengths, as plan "chunks" needs to count the bytes of the scored tokens."""

    byte_exact = True

    def byte_lengths(self):
        return [1] * 256 + [0] * (VOCAB - 256)


@pytest.mark.parametrize("plan, max_length, head, extra", [
    ("lm-eval", 8, True, {}), ("sliding", 10, True, {}), ("lm-eval", 7, False, {}),
    ("chunks", 6, True, dict(score_from=2))])
def test_kl_matches_a_float64_loop(models, docs, monkeypatch, plan, max_length, head, extra):
    monkeypatch.setattr(cmp, "LOGITS_BYTES", 4 * VOCAB * 5)  # logits of 5 rows at a time: odd chunks
    ref, mod = (load_model(m, device="cpu") for m in models)
    if not head:  # the model without a separable head: scored from its full logits
        mod = dataclasses.replace(mod, head=None)
    tok = ExactByteTokenizer()
    res = cmp.kl_divergence(ref, mod, tok, docs, plan=plan, max_length=max_length, batch_size=3, progress=False,
                            **extra)
    tokens = [tok.encode(d.text) for d in docs]
    windows = plan_windows([len(t) for t in tokens], plan=plan, max_length=max_length,
                           prefix_id=BOS if plan == "lm-eval" else None, **extra)
    want = _reference_kl(*models, tokens, windows)
    assert [d.index for d in res.per_document] == list(range(len(docs)))
    all_kl = []
    for d in res.per_document:
        w = want.get(d.index, dict(kl=[], nll_ref=0.0, nll=0.0, same=0, dp=0.0, dp2=0.0))
        all_kl += w["kl"]
        assert d.n_positions == len(w["kl"]) == d.reference.n_tokens == d.model.n_tokens
        assert d.kl_nats == pytest.approx(sum(w["kl"]), rel=1e-5, abs=1e-9)
        assert d.reference.nll_nats == pytest.approx(w["nll_ref"], rel=1e-5, abs=1e-9)
        assert d.model.nll_nats == pytest.approx(w["nll"], rel=1e-5, abs=1e-9)
        assert d.n_top1_same == w["same"]
        assert d.delta_p == pytest.approx(w["dp"], rel=1e-4, abs=1e-7)
        assert d.delta_p_sq == pytest.approx(w["dp2"], rel=1e-4, abs=1e-9)
        # plan "chunks" counts the bytes of the scored tokens (one byte each here), the others the text's
        assert d.reference.n_bytes == (d.n_positions if plan == "chunks" else docs[d.index].n_bytes)
    assert res.position_kl_nats.dtype == np.float32
    np.testing.assert_allclose(res.position_kl_nats, all_kl, rtol=1e-4, atol=1e-7)
    assert res.mean_kl_nats == pytest.approx(sum(all_kl) / len(all_kl), rel=1e-5)
    assert res.mean_kl_nats > 1e-3  # the perturbation is seen: the test can fail
    q = np.percentile(np.array(all_kl), [50, 90, 99, 99.9])
    assert list(res.percentiles().values()) == pytest.approx(q, rel=1e-4)


def test_kl_of_a_model_against_itself_is_zero(models, docs):
    ref = load_model(models[0], device="cpu")
    tok = ByteTokenizer()
    res = cmp.kl_divergence(ref, ref, tok, docs, max_length=8, batch_size=2, progress=False)
    s = res.summary(n_resamples=50)
    assert abs(s["mean_nats"]) < 1e-7 and abs(s["p999_nats"]) < 1e-6
    assert s["top1_agreement"] == 1.0 and s["delta_p_mean"] == 0.0 and s["delta_p_rms"] == 0.0
    assert res.reference_totals == res.model_totals
    # the NLL sums are the evaluation loop's
    ev = evaluate(ref, tok, docs, max_length=8, batch_size=2, progress=False)
    assert res.model_totals.nll_nats == pytest.approx(ev.totals.nll_nats, rel=1e-5)
    assert (res.model_totals.n_tokens, res.model_totals.n_bytes) == (ev.totals.n_tokens, ev.totals.n_bytes)


def test_kl_bootstrap_interval_resamples_documents(models, docs):
    ref, mod = (load_model(m, device="cpu") for m in models)
    res = cmp.kl_divergence(ref, mod, ByteTokenizer(), docs, max_length=8, progress=False)
    kl = np.array([d.kl_nats for d in res.per_document])
    n = np.array([d.n_positions for d in res.per_document], dtype=float)
    idx = np.random.default_rng(3).integers(0, len(kl), size=(200, len(kl)))
    ratio = kl[idx].sum(1) / n[idx].sum(1)
    assert res.bootstrap_ci(n_resamples=200, seed=3) == pytest.approx(tuple(np.quantile(ratio, [0.025, 0.975])))
    lo, hi = res.bootstrap_ci(n_resamples=200, seed=3)
    assert lo <= res.mean_kl_nats <= hi


def test_kl_refuses_output_heads_of_different_sizes(models, docs):
    ref = load_model(models[0], device="cpu")
    wide = load_model(_gpt2(2, vocab=VOCAB + 5), device="cpu")
    with pytest.raises(ValueError, match=f"{VOCAB} output classes .* {VOCAB + 5}"):
        cmp.kl_divergence(ref, wide, ByteTokenizer(), docs, max_length=8, progress=False)


# -- tokenizer identity ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_gpt2(assets):
    from lmloss.tokenizers import load_tokenizer

    return load_tokenizer(str(assets / "tokenizers" / "hf-gpt2"))


def _swapped_tokenizer_folder(assets, folder, a="The", b="Ġquick"):
    """The GPT-2 tokenizer with the ids of two tokens exchanged: same size, another mapping."""
    spec = json.loads((assets / "tokenizers" / "hf-gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    shutil.copy(assets / "tokenizers" / "hf-gpt2" / "tokenizer_config.json", folder)
    return folder


def test_tokenizer_difference(assets, hf_gpt2, tmp_path):
    from lmloss.tokenizers import load_tokenizer

    assert cmp.tokenizer_difference(load_tokenizer("gpt2"), hf_gpt2) == ""  # tiktoken and HF: the same ids
    assert "50257 ids" in cmp.tokenizer_difference(hf_gpt2, load_tokenizer("cl100k_base"))
    swapped = load_tokenizer(str(_swapped_tokenizer_folder(assets, tmp_path / "swapped")))
    assert swapped.vocab_size == hf_gpt2.vocab_size
    assert "encode a probe text differently" in cmp.tokenizer_difference(hf_gpt2, swapped)


# -- paired bootstrap --------------------------------------------------------------------------------

def test_paired_bootstrap_against_a_hand_computation():
    rng = np.random.default_rng(5)
    n_bytes = rng.integers(1, 500, size=9)
    nll = rng.uniform(0.2, 3.0, size=(3, 9)) * n_bytes
    nll[2, 4] = 0.0
    per_model = [[LossTotals(float(x), 10, int(b)) for x, b in zip(row, n_bytes)] for row in nll]
    res = cmp.paired_bootstrap(per_model, n_resamples=300, seed=11, level=0.9)
    idx = np.random.default_rng(11).integers(0, 9, size=(300, 9))
    ln2 = math.log(2)
    bpb = [[sum(nll[m][i] for i in draw) / (ln2 * sum(n_bytes[i] for i in draw)) for draw in idx] for m in range(3)]
    for m in range(3):
        assert res.bits_per_byte[m] == pytest.approx(nll[m].sum() / (ln2 * n_bytes.sum()), rel=1e-12)
        assert res.bits_per_byte_ci[m] == pytest.approx(tuple(np.quantile(bpb[m], [0.05, 0.95])), rel=1e-12)
    assert [(p.a, p.b) for p in res.pairs] == [(0, 1), (0, 2), (1, 2)]
    for p in res.pairs:
        deltas = [y - x for x, y in zip(bpb[p.a], bpb[p.b])]
        assert p.ci == pytest.approx(tuple(np.quantile(deltas, [0.05, 0.95])), rel=1e-9, abs=1e-12)
        assert p.delta_bits_per_byte == pytest.approx(res.bits_per_byte[p.b] - res.bits_per_byte[p.a], rel=1e-12)
        better = sum(nll[p.b][k] / n_bytes[k] < nll[p.a][k] / n_bytes[k] for k in range(9))
        assert (p.n_b_better, p.n_documents, p.share_b_better) == (better, 9, better / 9)


def test_a_models_interval_is_the_one_bootstrap_ci_gives(docs):
    rows = [DocumentResult(k, "", LossTotals(1.5 * (k + 1), 3, 4 + k, 1, 4 + k), f"{k:016x}") for k in range(6)]
    other = [DocumentResult(k, "", LossTotals(1.0 * (k + 2), 5, 4 + k, 1, 4 + k), f"{k:016x}") for k in range(6)]
    res = cmp.paired_bootstrap([rows, other], n_resamples=400, seed=0)
    assert res.bits_per_byte_ci[0] == pytest.approx(bootstrap_ci(rows, n_resamples=400)["bits_per_byte"], rel=1e-12)
    assert res.bits_per_byte_ci[1] == pytest.approx(bootstrap_ci(other, n_resamples=400)["bits_per_byte"], rel=1e-12)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_models():
    """Two models whose per-document losses share the documents' difficulty: pairing removes it."""
    rng = np.random.default_rng(0)
    n_bytes = rng.integers(50, 2000, size=60)
    hard = rng.normal(0, 0.3, size=60)  # per-document difficulty (nats per byte), shared
    a = n_bytes * (1.0 + hard)
    b = n_bytes * (0.97 + hard + rng.normal(0, 0.02, size=60))  # 0.03 nats per byte better, up to noise
    per_model = [[LossTotals(x, 1, int(n)) for x, n in zip(row, n_bytes)] for row in (a, b)]
    paired = cmp.paired_bootstrap(per_model, n_resamples=1000, seed=0).pairs[0]
    # unpaired: each model resampled on its own draw
    ln2 = math.log(2)
    ia, ib = (np.random.default_rng(s).integers(0, 60, size=(1000, 60)) for s in (1, 2))
    deltas = b[ib].sum(1) / (ln2 * n_bytes[ib].sum(1)) - a[ia].sum(1) / (ln2 * n_bytes[ia].sum(1))
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    assert paired.ci[1] - paired.ci[0] < 0.25 * (hi - lo)
    assert paired.ci[1] < 0 and lo < 0 < hi  # paired, b is better beyond doubt; unpaired, it is not


def test_paired_bootstrap_refuses_mismatched_documents():
    a = [DocumentResult(k, "", LossTotals(1.0, 1, 3), f"{k:016x}") for k in range(3)]
    with pytest.raises(ValueError, match="model 1 has 2 documents and model 0 has 3"):
        cmp.paired_bootstrap([a, a[:2]])
    other = a[:2] + [dataclasses.replace(a[2], text_sha256="f" * 16)]
    with pytest.raises(ValueError, match="scored different documents"):
        cmp.paired_bootstrap([a, other])
    with pytest.raises(TypeError, match="DocumentResult, a LossTotals or a dict"):
        cmp.paired_bootstrap([[1.0, 2.0]])
    single = cmp.paired_bootstrap([a[:1], a[:1]])
    assert single.pairs[0].ci is None and single.bits_per_byte_ci == [None, None]


def test_compare_library_call_evaluates_each_model(models, docs):
    loaded = [load_model(m, device="cpu") for m in models]
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="pass tokenizers"):
        cmp.compare(loaded, docs)
    res = cmp.compare(loaded + loaded[:1], docs, tokenizers=[tok] * 3, max_length=8, n_resamples=100,
                      progress=False)
    want = [evaluate(m, tok, docs, max_length=8, progress=False).totals for m in loaded]
    assert [r.totals for r in res.results] == [want[0], want[1], want[0]]
    assert res.same_tokenizer and any("again" in n for n in res.notes)
    assert res.paired.pairs[1].delta_bits_per_byte == 0.0  # model 0 against itself


# -- the command -------------------------------------------------------------------------------------

def _model_folder(path, module, assets, tokenizer_folder=None):
    module.save_pretrained(path)
    src = tokenizer_folder or assets / "tokenizers" / "hf-gpt2"
    for f in src.iterdir():
        shutil.copy(f, path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, assets):
    """GPT-2-vocabulary models with the GPT-2 tokenizer: a, b = a perturbed, a 50304-class one, and one
    whose tokenizer has two ids swapped."""
    root = tmp_path_factory.mktemp("compare-models")
    a = _gpt2(0, vocab=50257, init=0.05, n_positions=32)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    swapped = _swapped_tokenizer_folder(assets, root / "swapped-tokenizer")
    return dict(a=_model_folder(root / "a", a, assets), b=_model_folder(root / "b", b, assets),
                wide=_model_folder(root / "wide", _gpt2(3, vocab=50304, n_positions=32), assets),
                swapped=_model_folder(root / "swapped", _gpt2(4, vocab=50257, n_positions=32), assets, swapped))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    texts = ["The cat sat on the mat.", "Bits per byte compare models; tokens do not.", "naïve café 日本語",
             "One more short line of text, with numbers 1 2 3."]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _numbers_after(label, text):
    return [float(x) for x in re.search(label + r"\s*=\s*([-\d.e]+) / ([-\d.e]+)", text).groups()]


def test_kl_command_json_table_and_plot(folders, corpus, tmp_path, capsys):
    out, png = tmp_path / "kl.json", tmp_path / "kl.png"
    argv = ["--reference", folders["a"], "--model", folders["b"], "--dataset", corpus, "--max-length", "8",
            "--bootstrap", "100", "--no-progress", "--output", str(out), "--plot", str(png)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) >= {"kl", "reference", "model", "pair", "documents", "config", "versions", "notes"}
    kl = res["kl"]
    assert set(kl) >= {"mean_nats", "median_nats", "p90_nats", "p99_nats", "p999_nats", "top1_agreement",
                       "delta_p_mean", "delta_p_rms", "n_positions", "ci"}
    assert kl["mean_nats"] == pytest.approx(kl["sum_kl_nats"] / kl["n_positions"], rel=1e-12)
    assert kl["ci"][0] <= kl["mean_nats"] <= kl["ci"][1]
    assert kl["median_nats"] <= kl["p90_nats"] <= kl["p99_nats"] <= kl["p999_nats"]
    for role in ("reference", "model"):
        assert set(res[role]) >= {"model", "totals", "metrics"}
        t = res[role]["totals"]
        assert res[role]["metrics"]["bits_per_byte"] == pytest.approx(t["nll_nats"] / (math.log(2) * t["n_bytes"]))
        assert t["n_tokens"] == kl["n_positions"]
    assert res["pair"]["delta_bits_per_byte"] == pytest.approx(
        res["model"]["metrics"]["bits_per_byte"] - res["reference"]["metrics"]["bits_per_byte"])
    # every printed statistic from its printed sums
    s, n = _numbers_after(r"sum_kl_nats / n_positions", printed)
    assert n == kl["n_positions"] and s == pytest.approx(kl["sum_kl_nats"], rel=1e-9)
    assert re.search(r"mean_nats\s+" + re.escape(f"{s / n:.6g}"), printed)
    same, n = _numbers_after(r"n_top1_same / n_positions", printed)
    assert re.search(r"top1_agreement\s+" + re.escape(f"{same / n:.6g}"), printed)
    dp, n = _numbers_after(r"sum_delta_p / n_positions", printed)
    assert re.search(r"delta_p_mean\s+" + re.escape(f"{dp / n:.6g}"), printed)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the library call gives the same numbers
    from lmloss.tokenizers import load_tokenizer

    lib = cmp.kl_divergence(load_model(folders["a"], device="cpu"), load_model(folders["b"], device="cpu"),
                            load_tokenizer(folders["a"]), __import__("lmloss").load_corpus(corpus), max_length=8,
                            progress=False)
    assert lib.mean_kl_nats == pytest.approx(kl["mean_nats"], rel=1e-12)


def test_paired_command_json_table_and_plot(folders, corpus, tmp_path, capsys):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    argv = ["--models", f"{folders['a']},{folders['b']},{folders['swapped']}", "--dataset", corpus,
            "--max-length", "8", "--bootstrap", "200", "--no-progress", "--output", str(out), "--plot", str(png)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) >= {"models", "pairs", "config", "token_perplexity_comparable"}
    assert [m["model"] for m in res["models"]] == [folders["a"], folders["b"], folders["swapped"]]
    assert res["token_perplexity_comparable"] is False and "not comparable: tokenizers differ" in printed
    for m in res["models"]:
        assert set(m) >= {"model", "totals", "metrics", "documents"} and len(m["documents"]) == 4
        assert LossTotals.from_rows(m["documents"]) == LossTotals(**m["totals"])
        assert set(m["metrics"]) >= {"token_perplexity", "bits_per_byte", "bits_per_char"}
    a, b, swapped = folders["a"], folders["b"], folders["swapped"]
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [(a, b), (a, swapped), (b, swapped)]
    bpb = [m["metrics"]["bits_per_byte"] for m in res["models"]]
    for p in res["pairs"]:
        assert set(p) >= {"a", "b", "delta_bits_per_byte", "ci", "share_b_better"}
        assert p["delta_bits_per_byte"] == pytest.approx(bpb[p["b_index"]] - bpb[p["a_index"]], rel=1e-12)
        assert p["ci"][0] <= p["delta_bits_per_byte"] <= p["ci"][1]
        docs_a, docs_b = res["models"][p["a_index"]]["documents"], res["models"][p["b_index"]]["documents"]
        better = sum(y["nll_nats"] / y["n_bytes"] < x["nll_nats"] / x["n_bytes"] for x, y in zip(docs_a, docs_b))
        assert p["share_b_better"] == better / 4
    # the models' sums are lmloss.evaluate's, each under its own tokenizer
    from lmloss.tokenizers import load_tokenizer

    docs = __import__("lmloss").load_corpus(corpus)
    for m in res["models"]:
        want = evaluate(load_model(m["model"], device="cpu"), load_tokenizer(m["model"]), docs, max_length=8,
                        progress=False)
        assert LossTotals(**m["totals"]) == want.totals
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_model_twice_is_allowed_with_a_note(folders, corpus, capsys):
    out = cli.run(cli.parse_args(["--models", f"{folders['a']},{folders['a']}", "--dataset", corpus,
                                  "--max-length", "8", "--bootstrap", "50", "--no-progress"]))
    assert out["pairs"][0]["delta_bits_per_byte"] == 0.0 and out["token_perplexity_comparable"] is True
    assert "again" in capsys.readouterr().out


def test_the_script_and_the_module_show_the_same_parser():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    via_module, via_script = (subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                                             timeout=300, cwd=root)
                              for argv in (["-m", "lmloss", "compare-models"], ["scripts/compare_models.py"]))
    assert via_module.returncode == 0 == via_script.returncode, via_module.stderr + via_script.stderr
    assert "usage: lmloss compare-models" in via_module.stdout and via_script.stdout == via_module.stdout


@pytest.mark.parametrize("argv, words", [
    (["--reference", "x"], "--reference needs --model"),
    (["--model", "x"], "--model needs --reference"),
    ([], "pass --reference A --model B"),
    (["--models", "x"], "--models needs 2 or more models"),
    (["--models", "x,"], "--models needs 2 or more models"),
    (["--models", "x,y", "--reference", "z"], "two modes"),
    (["--models", "x,y", "--tokenizers", "gpt2"], "1 tokenizers for 2 models"),
    (["--models", "x,y", "--tokenizer", "gpt2"], "--tokenizer is for KL mode"),
    (["--reference", "x", "--model", "y", "--tokenizers", "gpt2,gpt2"], "--tokenizers is for --models"),
    (["--models", "x,y", "--stride", "4"], "--stride is for --plan sliding"),
    (["--models", "x,y", "--bootstrap", "-1"], "--bootstrap must be"),
    (["--models", "x,y", "--chunks", "3"], "--score-from and --chunks are for --plan chunks"),
    (["--models", "x,y", "--preset", "no-such-preset"], "unknown preset"),
])
def test_bad_option_combinations_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["lm-eval", "llama.cpp", "gptq", "hf-sliding"])
def test_eval_presets_apply_here_too(preset):
    """Every preset of lmloss eval sets options this command has: the command line still wins."""
    from lmloss import cli_eval

    mine = vars(cli.parse_args(["--models", "x,y", "--preset", preset]))
    theirs = vars(cli_eval.parse_args(["--preset", preset]))
    keys = ("plan", "form", "detokenize", "max_length", "score_from", "add_bos", "bos_every_window")
    assert {k: mine[k] for k in keys} == {k: theirs[k] for k in keys}
    assert cli.parse_args(["--models", "x,y", "--preset", preset, "--max-length", "16"]).max_length == 16


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model's weights were loaded before the inputs were checked")

    monkeypatch.setattr(cli.lmloss, "load_model", refuse)
    monkeypatch.setattr(cmp, "kl_divergence", refuse)


@pytest.mark.parametrize("case, words", [
    ("swapped tokenizer", r"has another tokenizer than the shared one \(tokenizers .* encode a probe text"),
    ("wider head", r"50257 output classes and --model .* has 50304"),
    ("max length", r"--max-length 64 is above the context length"),
    ("two corpora", r"names 2 corpora"),
    ("plot suffix", r"--plot .* does not end in .png"),
    ("shorter than a chunk", r"plan 'chunks' scores whole chunks of 32 tokens \(--max-length\) and drops the "
                             r"rest, but the longest of its 4 documents has 1[0-9] tokens"),
])
def test_errors_come_before_any_model_loads(folders, corpus, tmp_path, capsys, no_weights, case, words):
    base = ["--reference", folders["a"], "--dataset", corpus, "--no-progress"]
    argv = {"swapped tokenizer": base + ["--model", folders["swapped"]],
            "wider head": base + ["--model", folders["wide"], "--tokenizer", folders["a"]],
            "max length": base + ["--model", folders["b"], "--max-length", "64"],
            "two corpora": base + ["--model", folders["b"], "--dataset", f"{corpus},{tmp_path / 'x.txt'}"],
            "plot suffix": base + ["--model", folders["b"], "--plot", str(tmp_path / "p.jpg")],
            "shorter than a chunk": base + ["--model", folders["b"], "--plan", "chunks", "--max-length", "32"]}[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(words, err) and "Traceback" not in err


def test_paired_mode_checks_every_model_before_loading_any(folders, corpus, capsys, no_weights):
    argv = ["--models", f"{folders['a']},{folders['b']}", "--tokenizers", f"{folders['a']},cl100k_base",
            "--dataset", corpus, "--no-progress"]
    assert cli.main(argv) == 2
    assert "is not this model's tokenizer" in capsys.readouterr().err


def test_paired_mode_refuses_a_corpus_shorter_than_a_chunk_naming_the_model(folders, corpus, capsys, no_weights):
    argv = ["--models", f"{folders['a']},{folders['b']}", "--dataset", corpus, "--no-progress",
            "--plan", "chunks", "--max-length", "32"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folders['a']}: --dataset {corpus}: plan 'chunks' scores whole chunks of 32")
    assert "--form stream" in err and "Traceback" not in err
