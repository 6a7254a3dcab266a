"""The installed `lmloss` command and `python -m lmloss`: one entry point over the same parsers as
scripts/eval.py and scripts/compare_tokenizers.py."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmloss import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("command, option", [("eval", "--max-length"), ("compare-tokenizers", "--tokenizers")])
def test_module_and_scripts_show_the_same_parser(command, option):
    via_module = _run("-m", "lmloss", command, "--help")
    script = {"eval": "scripts/eval.py", "compare-tokenizers": "scripts/compare_tokenizers.py"}[command]
    via_script = _run(script, "--help")
    assert via_module.returncode == 0 == via_script.returncode, via_module.stderr + via_script.stderr
    assert option in via_module.stdout and f"usage: lmloss {command}" in via_module.stdout
    assert via_script.stdout == via_module.stdout


def test_the_console_script_is_installed_beside_the_interpreter():
    exe = shutil.which("lmloss", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("lmloss is not installed in this environment (pip install -e . installs it)")
    out = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage: lmloss eval" in out.stdout


def test_unknown_or_missing_command_lists_the_commands(capsys):
    assert cli.main([]) == 2 and "compare-tokenizers" in capsys.readouterr().err
    assert cli.main(["evaluate"]) == 2 and "unknown command 'evaluate'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "eval" in capsys.readouterr().out


# --- lmloss eval: inputs that cannot work are refused before the model's weights load ----------------

@pytest.fixture
def loads(monkeypatch):
    """Calls of lmloss.load_model; each one fails, so a run that gets there ends with exit 1."""
    import lmloss

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise RuntimeError("the model loader was called")

    monkeypatch.setattr(lmloss, "load_model", refuse)
    return calls


def _eval(tiny_model, assets, *argv):
    from lmloss import cli_eval

    return cli_eval.main(["--model", tiny_model, "--tokenizer", str(assets / "tokenizers" / "hf-gpt2"),
                          "--data-dir", str(assets / "corpora"), "--no-progress", "--bootstrap", "0", *argv])


def _text(n_tokens: int) -> str:
    """n_tokens GPT-2 tokens: "a", then " a" n_tokens - 1 times (each " a" one token)."""
    return "a" + " a" * (n_tokens - 1)


@pytest.mark.parametrize("preset", ["llama.cpp", "gptq"])
def test_a_text_shorter_than_one_chunk_is_refused_before_the_model_loads(preset, tiny_model, assets, tmp_path,
                                                                          capsys, loads):
    from lmloss.tokenizers import load_tokenizer

    tok = load_tokenizer(str(assets / "tokenizers" / "hf-gpt2"))
    assert len(tok.encode(_text(63))) == 63 and not tok.add_bos  # what the numbers below rest on
    short, exact = tmp_path / "short.txt", tmp_path / "exact.txt"
    short.write_text(_text(63))
    exact.write_text(_text(64))
    argv = ["--preset", preset, "--max-length", "64"]
    assert _eval(tiny_model, assets, *argv, "--dataset", str(short)) == 2
    err = capsys.readouterr().err
    assert loads == [] and "Traceback" not in err
    assert (f"--dataset {short}: plan 'chunks' scores whole chunks of 64 tokens (--max-length) and drops the "
            "rest, but the longest of its 1 documents has 63 tokens, so no token would be scored. Pass "
            "--max-length 63 or less, or a longer text") in err
    # one token more, or BOS counted in the token list: a chunk is full, and the model is loaded
    assert _eval(tiny_model, assets, *argv, "--dataset", str(exact)) == 1 and len(loads) == 1
    assert _eval(tiny_model, assets, *argv, "--dataset", str(short), "--add-bos", "yes") == 1 and len(loads) == 2
    assert "the model loader was called" in capsys.readouterr().err


def test_the_chunk_check_reads_only_a_prefix_of_a_long_text_and_suggests_joining_short_rows(
        tiny_model, assets, tmp_path, capsys, loads, monkeypatch):
    import json

    import lmloss.encode

    long = tmp_path / "long.txt"
    long.write_text(_text(20_000))
    encoded = []
    real = lmloss.encode.encode_document
    monkeypatch.setattr(lmloss.encode, "encode_document",
                        lambda tok, text, **k: encoded.append(len(text)) or real(tok, text, **k))
    assert _eval(tiny_model, assets, "--preset", "llama.cpp", "--max-length", "64", "--dataset", str(long)) == 1
    assert len(loads) == 1 and encoded == [16 * 64]  # 1024 characters told it, not 40,000
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": _text(40)}) + "\n" for _ in range(5)))
    argv = ["--plan", "chunks", "--max-length", "64", "--dataset", str(rows)]
    assert _eval(tiny_model, assets, *argv) == 2 and len(loads) == 1
    err = capsys.readouterr().err
    assert "the longest of its 5 documents has 40 tokens" in err and "--form stream (the documents joined" in err
    assert _eval(tiny_model, assets, *argv, "--form", "stream") == 1 and len(loads) == 2


def test_chunks_with_a_tokenizer_that_cannot_count_bytes_is_refused_before_the_model_loads(
        tiny_model, assets, tmp_path, capsys, loads):
    # A SentencePiece-style tokenizer whose NFKC normalizer rewrites text ("ﬁ" -> "fi"): its tokens do
    # not give the text's bytes back, so plan "chunks" (which counts the scored tokens' bytes) cannot work.
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "a": 260}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    folder = tmp_path / "nfkc-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    text = tmp_path / "a.txt"
    text.write_text(_text(200))
    argv = ["--model", tiny_model, "--tokenizer", str(folder), "--data-dir", str(assets / "corpora"),
            "--no-progress", "--bootstrap", "0", "--dataset", str(text), "--max-length", "64"]
    from lmloss import cli_eval

    assert cli_eval.main(argv + ["--plan", "chunks"]) == 2
    err = capsys.readouterr().err
    assert loads == [] and "Traceback" not in err
    assert "plan 'chunks' counts the bytes of the scored tokens" in err and "cannot give exact byte counts" in err
    assert "use plan 'lm-eval' or 'sliding'" in err
    # plan lm-eval counts the whole text's bytes, so this check is not its; (this toy tokenizer then
    # fails the vocabulary check against the GPT-2-sized model, also before loading)
    assert cli_eval.main(argv + ["--plan", "lm-eval"]) == 2 and loads == []
    assert "plan 'chunks'" not in capsys.readouterr().err


def test_a_form_the_corpus_lacks_is_refused_with_the_forms_it_has(tiny_model, assets, capsys, loads):
    assert _eval(tiny_model, assets, "--preset", "llama.cpp", "--max-length", "64", "--dataset", "lambada") == 2
    err = capsys.readouterr().err
    assert loads == [] and "corpus 'lambada' has forms ('rows', 'stream'), got form='raw'" in err
    assert "'stream' is the closest here (llama.cpp's whole-file text). Pass --form stream (one document, the " \
           "rows joined by '\\n\\n') or --form rows (each row its own document)" in err
