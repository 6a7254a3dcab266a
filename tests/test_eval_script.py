"""scripts/eval.py: presets as defaults, the results file, the table, and errors without tracebacks."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lmloss_eval_script", ROOT / "scripts" / "eval.py")
eval_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_script)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base_args(tiny_model, assets):
    return ["--model", tiny_model, "--tokenizer", str(assets / "tokenizers" / "hf-gpt2"),
            "--data-dir", str(assets / "corpora"), "--no-progress", "--bootstrap", "100"]


def test_presets_are_defaults_and_the_command_line_wins():
    args = eval_script.parse_args(["--preset", "hf-sliding"])
    assert (args.plan, args.form, args.max_length, args.stride) == ("sliding", "stream", 1024, None)
    assert args.detokenize is False
    args = eval_script.parse_args(["--preset", "hf-sliding", "--max-length", "256", "--stride", "64"])
    assert (args.max_length, args.stride) == (256, 64)
    args = eval_script.parse_args(["--preset", "lm-eval"])
    assert (args.plan, args.form, args.detokenize, args.max_length) == ("lm-eval", "pages", True, None)


def test_model_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LMLOSS_MODEL", "some/model")
    assert eval_script.parse_args([]).model == "some/model"
    monkeypatch.delenv("LMLOSS_MODEL")
    assert eval_script.parse_args([]).model == "gpt2"
    assert eval_script.parse_args([]).dataset == "wikitext"


@pytest.mark.parametrize("argv, match", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--plan", "sliding", "--max-length", "8", "--stride", "9"], "--stride must be between 1 and"),
    (["--plan", "sliding", "--stride", "0"], "--stride must be between 1 and"),
    (["--stride", "4"], "--stride is for --plan sliding"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_bad_flags_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_script.parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_end_to_end_results_json_table_and_plot(base_args, tmp_path, capsys):
    out, png, npz = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "t.npz"
    rc = eval_script.main(base_args + ["--preset", "lm-eval", "--max-length", "64", "--limit", "2",
                                       "--output", str(out), "--plot", str(png), "--token-nll", str(npz)])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    t, m = res["totals"], res["metrics"]
    assert set(t) == {"nll_nats", "n_tokens", "n_bytes", "n_words", "n_chars"}
    assert m["bits_per_byte"] == pytest.approx(t["nll_nats"] / (math.log(2) * t["n_bytes"]))
    assert m["word_perplexity"] == pytest.approx(math.exp(t["nll_nats"] / t["n_words"]))
    assert m["token_perplexity"] == pytest.approx(math.exp(t["nll_nats"] / t["n_tokens"]))
    assert m["byte_perplexity"] == pytest.approx(math.exp(t["nll_nats"] / t["n_bytes"]))
    assert len(res["documents"]) == 2
    assert {"index", "nll_nats", "n_tokens", "n_bytes", "n_words"} <= set(res["documents"][0])
    assert sum(d["nll_nats"] for d in res["documents"]) == pytest.approx(t["nll_nats"], rel=1e-12)
    assert res["config"]["resolved"]["plan"] == "lm-eval" and res["config"]["max_length"] == 64
    assert res["config"]["batch_size"] is None and res["config"]["resolved"]["batch_size"] == 2  # CPU default
    assert res["versions"]["lmloss"] and res["versions"]["torch"]
    assert set(res["confidence_intervals"]) >= {"bits_per_byte", "token_perplexity"}
    for name in ("token_perplexity", "byte_perplexity", "word_perplexity", "bits_per_byte"):
        assert name in printed
    assert str(t["n_bytes"]) in printed and f"{t['nll_nats']:.4f}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import numpy as np

    dumped = np.load(npz)
    dumped_nll = sum(dumped[k].astype(np.float64).sum() for k in dumped.files)
    assert dumped_nll == pytest.approx(t["nll_nats"], rel=1e-6)


@pytest.mark.parametrize("extra, match", [
    (["--model", "no-such-org/no-such-model-lmloss", "--tokenizer", "gpt2"], "could not load model"),
    (["--dataset", "no-such-corpus"], "unknown corpus"),
    (["--max-length", "4096"], "above the context length"),
    (["--limit", "0"], "limit"),
])
def test_user_errors_print_a_message_not_a_traceback(base_args, extra, match, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc = eval_script.main(base_args + ["--limit", "1"] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and "error: " in err and match in err and "Traceback" not in err


def test_default_batch_size_follows_the_device_and_head():
    from types import SimpleNamespace as NS

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert eval_script.default_batch_size(NS(device=cpu, head=object())) == 2
    assert eval_script.default_batch_size(NS(device=cuda, head=object())) == 32
    assert eval_script.default_batch_size(NS(device=cuda, head=None)) == 8  # full logits per batch
