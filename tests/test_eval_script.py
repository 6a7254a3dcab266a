"""lmloss eval (scripts/eval.py): presets as defaults, the results file, the table, and errors without tracebacks."""
import json
import math
from pathlib import Path

import pytest
import torch

from lmloss import cli_eval as eval_script

ROOT = Path(__file__).resolve().parents[1]


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
    assert res["runtime"]["threads"] >= 1 and res["runtime"]["malloc"].startswith("default")  # main(argv)
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
    (["--model", "no-such-org/no-such-model-lmloss", "--tokenizer", "gpt2"],
     "model 'no-such-org/no-such-model-lmloss': tried the Hugging Face Hub name"),
    (["--dataset", "no-such-corpus"], "unknown corpus"),
    (["--max-length", "4096"], "above the context length"),
])
def test_user_errors_print_a_message_not_a_traceback(base_args, extra, match, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc = eval_script.main(base_args + ["--limit", "1"] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and "error: " in err and match in err and "Traceback" not in err


def test_default_batch_size_follows_the_device_and_head():
    from types import SimpleNamespace as NS

    from lmloss.evaluate import default_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_batch_size(NS(device=cpu, head=object())) == 2
    assert default_batch_size(NS(device=cuda, head=object())) == 32
    assert default_batch_size(NS(device=cuda, head=None)) == 8  # full logits per batch


# --- never a wrong number with exit 0, and errors before work -------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Any load of model weights fails the test: the error must come before it."""
    import lmloss

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(lmloss, "load_model", refuse)


def _error(argv, capsys) -> str:
    rc = eval_script.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, match", [
    (["--max-length", "4096"], "above the context length of .* \\(128\\)"),
    (["--tokenizer", "cl100k_base"], "emits ids up to 100\\d\\d\\d, but .* has 50257 embedding rows"),
    (["--token-nll", "t.txt"], "--token-nll 't.txt' does not end in .npz"),
    (["--plot", "f.txt/x.png"], "f.txt is not an existing folder"),
    (["--plot", "no/such/dir/x.png"], "no/such/dir is not an existing folder; create it"),
    (["--output", "."], "--output '.' is a folder"),
    (["--dataset", "lambada,wikitext,lambada"], "names \\['lambada'\\] more than once"),
    (["--dataset", " , "], "names no corpus"),
])
def test_bad_options_are_refused_before_the_model_is_loaded(base_args, extra, match, tmp_path, capsys,
                                                            monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("a file, not a folder")
    assert __import__("re").search(match, _error(base_args + ["--limit", "1"] + extra, capsys))


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model, assets, capsys, no_model_load):
    err = _error(["--model", tiny_model, "--data-dir", str(assets / "corpora"), "--limit", "1",
                  "--no-progress"], capsys)
    assert "tokenizer" in err


@pytest.mark.parametrize("argv", [["--bootstrap", "-1"], ["--limit", "0"], ["--resume"], ["--overwrite"],
                                  ["--resume", "--overwrite", "--output", "r.json"]])
def test_bad_numbers_and_flag_combinations_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_script.parse_args(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_an_earlier_runs_checkpoint_is_never_discarded_silently(base_args, tmp_path, capsys, monkeypatch):
    from lmloss.checkpoint import Checkpoint, checkpoint_path

    out = tmp_path / "r.json"
    argv = base_args + ["--preset", "lm-eval", "--max-length", "64", "--limit", "2", "--output", str(out)]
    with Checkpoint(checkpoint_path(out), {"earlier": "run"}) as ck:
        ck.append(dict(index=0, nll_nats=1.0, n_tokens=1, n_bytes=1, n_words=1, n_chars=1, text_sha256="0"))
    before = checkpoint_path(out).read_bytes()
    err = _error(argv, capsys)
    assert "holds 1 finished documents" in err and "--resume" in err and "--overwrite" in err
    assert checkpoint_path(out).read_bytes() == before and not out.exists()
    err = _error(argv + ["--resume"], capsys)  # and it is not this configuration's
    assert "another configuration" in err and checkpoint_path(out).read_bytes() == before
    assert eval_script.main(argv + ["--overwrite"]) == 0
    assert out.exists() and not checkpoint_path(out).exists()


def test_results_file_mode_follows_the_umask_and_glob_characters_in_its_name_resume(base_args, tmp_path,
                                                                                    monkeypatch):
    import os

    import lmloss
    from lmloss.checkpoint import checkpoint_path

    out = tmp_path / "run[1].json"
    argv = base_args + ["--preset", "lm-eval", "--max-length", "64", "--limit", "3", "--batch-size", "2",
                        "--output", str(out)]
    old = os.umask(0o022)
    try:
        assert eval_script.main(argv) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    full = json.loads(out.read_text())
    out.unlink()
    real_evaluate = lmloss.evaluate

    def killed_after_one_document(*a, **k):
        def stop(doc):  # called once the document is in the checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*a, **k, on_document=stop)

    with monkeypatch.context() as m:
        m.setattr(lmloss, "evaluate", killed_after_one_document)
        assert eval_script.main(argv) == 130
    assert checkpoint_path(out).exists() and not out.exists()
    assert eval_script.main(argv + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["documents"] == full["documents"] and again["totals"] == full["totals"]
    assert again["config"]["resolved"]["resumed_documents"] == 1
    assert not checkpoint_path(out).exists()


def test_a_failure_after_the_results_are_written_says_what_was_written(base_args, tmp_path, capsys,
                                                                       monkeypatch):
    from lmloss.checkpoint import checkpoint_path

    def full_disk(path, result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval_script, "save_plot", full_disk)
    out = tmp_path / "r.json"
    err = _error(base_args + ["--max-length", "64", "--limit", "1", "--output", str(out),
                              "--plot", str(tmp_path / "p.png")], capsys)
    assert "No space left" in err and f"already written, complete: {out}" in err
    assert json.loads(out.read_text())["totals"]["n_tokens"] > 0 and not checkpoint_path(out).exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(base_args, capsys, monkeypatch):
    import lmloss

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(lmloss, "evaluate", broken)
    argv = base_args + ["--max-length", "64", "--limit", "1"]
    assert eval_script.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: CUDA error" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="illegal memory access"):
        eval_script.main(argv + ["--debug"])


def test_several_corpora_in_one_run_equal_single_runs_and_pool_by_sums(base_args, tmp_path, capsys):
    argv = base_args + ["--max-length", "64", "--limit", "3", "--batch-size", "2"]
    singles = []
    for name in ("wikitext", "lambada"):
        out = tmp_path / f"{name}.json"
        assert eval_script.main(argv + ["--dataset", name, "--output", str(out)]) == 0
        singles.append(json.loads(out.read_text()))
    out, png = tmp_path / "both.json", tmp_path / "both.png"
    assert eval_script.main(argv + ["--dataset", "wikitext, lambada", "--output", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    both = json.loads(out.read_text())
    assert [c["config"]["resolved"]["dataset"] for c in both["corpora"]] == ["wikitext", "lambada"]
    for got, want in zip(both["corpora"], singles):
        assert got["documents"] == want["documents"] and got["totals"] == want["totals"]
        assert set(got) == set(want)  # each corpus keeps the single-corpus schema
    summed = {k: sum(s["totals"][k] for s in singles) for k in ("n_tokens", "n_bytes", "n_words", "n_chars")}
    pooled = both["pooled"]
    assert {k: pooled["totals"][k] for k in summed} == summed
    nll = singles[0]["totals"]["nll_nats"] + singles[1]["totals"]["nll_nats"]
    assert pooled["metrics"]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * summed["n_bytes"]), rel=1e-12)
    assert "pooled (summed totals)" in printed and f"{nll:.4f}" in printed
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.partial*"))


def test_text_field_and_subset_go_only_to_the_corpora_they_apply_to(base_args, tmp_path, capsys):
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"id": i, "body": f"post number {i} says hello"}) + "\n" for i in range(3)))
    argv = base_args + ["--max-length", "64", "--limit", "2", "--bootstrap", "0"]
    out = tmp_path / "r.json"
    assert eval_script.main(argv + ["--dataset", f"lambada,{posts}", "--text-field", "body", "--output", str(out)]) == 0
    assert [c["totals"]["n_bytes"] > 0 for c in json.loads(out.read_text())["corpora"]] == [True, True]
    err = _error(argv + ["--dataset", "lambada", "--text-field", "body"], capsys)
    assert "--text-field 'body' picks a field" in err
    err = _error(argv + ["--dataset", "lambada", "--subset", "ArXiv"], capsys)
    assert "--subset 'ArXiv' picks a part of a named corpus" in err


def test_resume_works_across_corpora(base_args, tmp_path, monkeypatch):
    import lmloss

    out = tmp_path / "r.json"
    argv = base_args + ["--dataset", "wikitext,lambada", "--max-length", "64", "--limit", "3", "--batch-size", "2",
                        "--bootstrap", "0", "--output", str(out)]
    assert eval_script.main(argv) == 0
    full = json.loads(out.read_text())
    out.unlink()
    real_evaluate, calls = lmloss.evaluate, []

    def killed_in_the_second_corpus(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            def stop(doc):
                raise KeyboardInterrupt
            k["on_document"] = stop
        return real_evaluate(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(lmloss, "evaluate", killed_in_the_second_corpus)
        assert eval_script.main(argv) == 130
    assert sorted(p.name for p in tmp_path.glob("r.json.partial*")) == ["r.json.partial.c1.jsonl", "r.json.partial.jsonl"]
    assert eval_script.main(argv + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert [c["config"]["resolved"]["resumed_documents"] for c in again["corpora"]] == [3, 1]
    assert [c["documents"] for c in again["corpora"]] == [c["documents"] for c in full["corpora"]]
    assert again["pooled"] == full["pooled"] and not list(tmp_path.glob("r.json.partial*"))


def test_token_stats_table_json_and_npz_columns(base_args, tmp_path, capsys):
    out, npz = tmp_path / "r.json", tmp_path / "t.npz"
    rc = eval_script.main(base_args + ["--preset", "lm-eval", "--max-length", "64", "--limit", "2", "--token-stats",
                                       "--output", str(out), "--token-nll", str(npz)])
    assert rc == 0
    printed = capsys.readouterr().out
    st = json.loads(out.read_text())["token_stats"]
    assert st["n_tokens"] == json.loads(out.read_text())["totals"]["n_tokens"]
    assert st["mean_entropy_nats"] == pytest.approx(st["entropy_nats"] / st["n_tokens"])
    assert sum(st["rank_counts"].values()) == st["n_tokens"] and st["rank_counts"]["0"] == st["top1"]
    assert f"top1 / n_tokens = {st['top1']} / {st['n_tokens']}" in printed
    import numpy as np

    dumped = np.load(npz)
    for i in (0, 1):
        n = dumped[f"doc_{i}"].shape
        assert dumped[f"doc_{i}_entropy"].shape == dumped[f"doc_{i}_rank"].shape == dumped[f"doc_{i}_argmax"].shape == n
    assert sum(int((dumped[f"doc_{i}_rank"] == 0).sum()) for i in (0, 1)) == st["top1"]


def test_chunks_options_need_the_chunks_plan(capsys):
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--chunks", "3"])
    assert "--score-from and --chunks are for --plan chunks" in capsys.readouterr().err
    args = eval_script.parse_args(["--preset", "llama.cpp", "--chunks", "3"])
    assert (args.plan, args.form, args.max_length, args.score_from, args.add_bos, args.chunks) == \
        ("chunks", "raw", 512, "half", "tokenizer", 3)
    args = eval_script.parse_args(["--preset", "gptq"])
    assert (args.plan, args.form, args.max_length, args.score_from, args.bos_every_window) == \
        ("chunks", "stream", 2048, 0, False)
