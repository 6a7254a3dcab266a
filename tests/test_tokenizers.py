"""Tokenizers: plain-text encoding and exact UTF-8 byte accounting, checked on real tokenizers and on
a small SentencePiece-style tokenizer built here with hand-computed byte lengths."""
import json
import os
import random
import subprocess
import sys
from array import array

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmloss.encode
from lmloss.encode import encode_document, encode_documents
from lmloss.tokenizers import HFTokenizer, Tokenizer, check_byte_lengths, load_tokenizer, token_byte_lengths

TIKTOKEN = ["gpt2", "cl100k_base", "o200k_base"]
SMOLLM2 = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
TRICKY = [
    "",
    "Hello, world!",
    " leading and trailing spaces  ",
    "naïve café — “quotes” and 日本語のテキスト 🤗🧪 emoji",  # multi-byte characters split across tokens
    "tabs\tand\r\nwindows newlines\n\n\n",
    "<|endoftext|> and <|im_start|> and <s> are plain text here",
    "\x00 control \x7f bytes \u200b zero-width \ufeff bom",
    "e\u0301 (combining accent) vs \u00e9 (precomposed)",
]


@pytest.fixture(scope="module")
def hf_gpt2(assets):
    return load_tokenizer(str(assets / "tokenizers" / "hf-gpt2"))


@pytest.fixture(scope="module")
def smollm2(assets):
    return load_tokenizer(str(assets / SMOLLM2))


@pytest.fixture(scope="module")
def wikitext_raw(assets):
    return (assets / "corpora" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def wikitext_stream(assets):
    path = assets / "corpora" / "wikitext-2-raw-v1" / "test.jsonl"
    rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n\n".join(rows)


# -- tiktoken -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TIKTOKEN)
@pytest.mark.parametrize("text", TRICKY)
def test_tiktoken_bytes_add_up_and_roundtrip(assets, name, text):
    tok = load_tokenizer(name)
    ids = tok.encode(text)
    lengths = tok.byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tiktoken_attributes_and_special_tokens(assets):
    tok = load_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == ("gpt2", 50257, 50256, 50256, False)
    assert tok.byte_lengths()[50256] == 0  # <|endoftext|>
    assert tok.byte_lengths()[198] == 1  # "\n"
    assert 50256 not in tok.encode("<|endoftext|>")  # special-token text is plain text, never raises
    cl = load_tokenizer("cl100k_base")
    lengths = cl.byte_lengths()
    assert len(lengths) == cl.vocab_size == 100277
    # 100256 is an unused id between the ranks and the specials; 100257.. are special tokens
    assert lengths[100256] == 0 and lengths[100257] == 0 and lengths[100276] == 0
    assert all(n >= 1 for n in lengths[:100256])


def test_token_bytes_not_str_decoding(assets):
    """A byte-level token may hold part of a UTF-8 character: decoding it to str alone gives U+FFFD
    (3 bytes), so counting the str would overcount. The table counts its raw bytes."""
    tok = load_tokenizer("gpt2")
    ids = tok.encode("🤗")  # 4 UTF-8 bytes
    lengths = tok.byte_lengths()
    assert len(ids) > 1 and sum(lengths[i] for i in ids) == 4
    str_bytes = sum(len(tok.decode([i]).encode("utf-8")) for i in ids)
    assert str_bytes != 4


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_byte_invariant_random_text(hf_gpt2, text):
    for tok in [*(load_tokenizer(name) for name in TIKTOKEN), hf_gpt2]:
        lengths = tok.byte_lengths()
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


# -- Hugging Face ---------------------------------------------------------------------------------

def test_hf_gpt2_matches_tiktoken(hf_gpt2):
    tt = load_tokenizer("gpt2")
    assert (hf_gpt2.vocab_size, hf_gpt2.bos_id, hf_gpt2.eos_id, hf_gpt2.add_bos) == (50257, 50256, 50256, False)
    # two independent byte tables: tiktoken's raw token bytes vs the byte-to-unicode map of vocab.json
    assert hf_gpt2.byte_lengths() == tt.byte_lengths()
    for text in TRICKY:
        assert hf_gpt2.encode(text) == tt.encode(text)
        assert hf_gpt2.decode(hf_gpt2.encode(text)) == text


def test_hf_leaves_callers_tokenizer_alone(assets):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(assets / "tokenizers" / "hf-gpt2"))
    tok = HFTokenizer(hf)
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert hf.encode("a<|endoftext|>b") == [64, 50256, 65]  # the caller's object still matches specials


def test_hf_never_truncates(assets):
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer.from_file(str(assets / "tokenizers" / "hf-gpt2" / "tokenizer.json"))
    rust.enable_truncation(5)  # as a tokenizer.json saved with max_length would
    text = "a b c d e f g h"
    assert len(load_tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust)).encode(text)) == 8


@pytest.mark.slow  # building the tokenizer from the GGUF file takes ~8 s on 2 cores
def test_smollm2_gguf_attributes(smollm2):
    assert smollm2.vocab_size == 49152 and smollm2.add_bos is False and smollm2.byte_exact
    lengths = smollm2.byte_lengths()
    assert lengths[:17] == [0] * 17  # <|endoftext|>, <|im_start|>, ... special tokens
    for text in TRICKY:
        ids = smollm2.encode(text)
        assert 1 not in ids and 0 not in ids  # '<|im_start|>' in text is not the special token
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
        assert smollm2.decode(ids) == text


def _sentencepiece_tokenizer(*, normalizer=None):
    """A byte-fallback BPE in SentencePiece's form: ' ' -> '▁', unknown chars -> <0xNN> bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "b", "▁a", "ab", "é"]:  # ids 259..264
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer or normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return load_tokenizer(hf)


def test_sentencepiece_rules_hand_computed():
    tok = _sentencepiece_tokenizer()
    lengths = tok.byte_lengths()
    assert tok.byte_exact and tok.vocab_size == 265 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert lengths[:3] == [0, 0, 0]  # <unk>, <s>, </s>
    assert lengths[3:259] == [1] * 256  # <0x00> .. <0xFF>: one byte each
    assert lengths[259:] == [1, 1, 1, 2, 2, 2]  # '▁' = 1 space byte, '▁a' = 2, 'ab' = 2, 'é' = 2
    text = "ab a€é<s>"
    ids = tok.encode(text)
    assert ids[:6] == [263, 262, 3 + 0xE2, 3 + 0x82, 3 + 0xAC, 264]  # '€' falls back to 3 bytes
    assert 1 not in ids
    assert check_byte_lengths(tok, text) == len(text.encode("utf-8")) == 12
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["prepend", "nfkc"])
def test_normalizing_tokenizer_is_flagged_not_silent(kind):
    from tokenizers import normalizers

    norm = {"prepend": normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
            "nfkc": normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])}[kind]
    tok = _sentencepiece_tokenizer(normalizer=norm)
    assert not tok.byte_exact and tok.byte_note
    with pytest.raises(ValueError, match="cannot give exact byte counts"):
        token_byte_lengths(tok)
    assert token_byte_lengths(tok, strict=False).shape == (tok.vocab_size,)
    text = "ab" if kind == "prepend" else "ﬁ ab"  # NFKC turns the ligature 'ﬁ' (3 bytes) into 'fi'
    with pytest.raises(ValueError, match="stand for"):
        check_byte_lengths(tok, text)


# -- token_byte_lengths and load_tokenizer -------------------------------------------------------

def test_token_byte_lengths_counts_target_bytes_by_indexing(assets):
    tok = load_tokenizer("o200k_base")
    lengths = token_byte_lengths("o200k_base")
    assert lengths.dtype == torch.int64 and lengths.shape == (200019,)
    texts = ["Bits per byte, not per token", "daß naïve Größe schön", "  日本語の テキスト です"]
    targets = torch.tensor([tok.encode(t)[:4] for t in texts])  # (B=3, T=4)
    # each row decodes to a whole-character prefix of its text, so its UTF-8 length is the reference
    prefixes = [tok.decode(row.tolist()) for row in targets]
    assert all(t.startswith(p) and "\ufffd" not in p for t, p in zip(texts, prefixes))
    assert lengths[targets].sum().item() == sum(len(p.encode("utf-8")) for p in prefixes)


def test_token_byte_lengths_pads_to_model_vocab(assets):
    lengths = token_byte_lengths("gpt2", vocab_size=50304)  # nanoGPT's padded embedding
    assert lengths.shape == (50304,) and torch.equal(lengths[:50257], token_byte_lengths("gpt2"))
    assert lengths[50257:].eq(0).all()
    with pytest.raises(ValueError, match="smaller than"):
        token_byte_lengths("gpt2", vocab_size=50000)


def test_load_tokenizer_errors(tmp_path, assets):
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR"):
        load_tokenizer("no-such-tokenizer-xyz")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="folder"):
        load_tokenizer(str(tmp_path))  # an empty folder holds no tokenizer
    with pytest.raises(TypeError, match="name or path"):
        load_tokenizer(42)


def test_load_tokenizer_is_cached(assets):
    path = str(assets / "tokenizers" / "hf-gpt2")
    assert load_tokenizer(path) is load_tokenizer(path)


# -- the whole WikiText-2 raw test text ----------------------------------------------------------

@pytest.mark.slow
def test_gpt2_stream_token_count_and_hf_ids(assets, wikitext_stream, hf_gpt2):
    ids = load_tokenizer("gpt2").encode(wikitext_stream)
    assert len(ids) == 287644  # the Hugging Face perplexity guide's count
    assert hf_gpt2.encode(wikitext_stream) == ids


@pytest.mark.slow
@pytest.mark.parametrize("spec", [*TIKTOKEN, "hf-gpt2", "smollm2-gguf"])
def test_byte_invariant_whole_wikitext(assets, spec, wikitext_raw, request):
    tok = {"hf-gpt2": lambda: request.getfixturevalue("hf_gpt2"),
           "smollm2-gguf": lambda: request.getfixturevalue("smollm2")}.get(spec, lambda: load_tokenizer(spec))()
    lengths = token_byte_lengths(tok)
    ids = torch.tensor(tok.encode(wikitext_raw))
    assert lengths[ids].sum().item() == len(wikitext_raw.encode("utf-8")) == 1290590


# -- tokenizers that would score nothing ---------------------------------------------------------

def test_model_folder_without_tokenizer_is_refused(tiny_model):
    """config.json + weights, no tokenizer files: AutoTokenizer builds a 1-entry GPT2Tokenizer that
    encodes every text to [], which would print 0 tokens and bits_per_byte 0.0 with exit 0."""
    with pytest.raises(ValueError) as err:
        load_tokenizer(tiny_model)
    msg = str(err.value)
    assert tiny_model in msg and "config.json" in msg  # the folder, and what it holds
    assert "vocab_size=1" in msg and "no tokens" in msg  # what was found
    assert "tokenizer.json" in msg and "merges.txt" in msg and "--tokenizer" in msg  # the fix


@pytest.mark.parametrize("vocab", [{}, {"x": 0, "y": 1, "xy": 2}])
def test_tokenizer_that_encodes_text_to_nothing_is_refused(vocab):
    """An empty BPE, and a 3-entry BPE without <unk> that drops every character it does not know."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    bpe = models.BPE(vocab, [("x", "y")] if vocab else [])
    hf = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer(bpe))
    with pytest.raises(ValueError, match="no tokens"):
        load_tokenizer(hf)


@pytest.mark.parametrize("header_check", [True, False])  # lmloss.models.check_gguf, or only the reader
@pytest.mark.parametrize("n_bytes", [1000, 0])
def test_truncated_gguf_is_a_value_error(tmp_path, assets, n_bytes, header_check, monkeypatch):
    import lmloss.models

    if not header_check:
        monkeypatch.delattr(lmloss.models, "check_gguf", raising=False)
    path = tmp_path / "x.gguf"
    with open(assets / SMOLLM2, "rb") as f:
        path.write_bytes(f.read(n_bytes))
    with pytest.raises(ValueError) as err:  # not struct.error or numpy's "cannot mmap an empty file"
        load_tokenizer(str(path))
    assert str(path) in str(err.value)


# -- encode_document: whole-text ids, computed in pieces -----------------------------------------

class _Recording(Tokenizer):
    """Passes encode() to `tok` and records the length of every text it is given."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []
        self.name, self.vocab_size = tok.name, tok.vocab_size

    def encode(self, text):
        self.calls.append(len(text))
        return self.tok.encode(text)


def _corpus(assets, which: str) -> str:
    if which == "wikitext":
        return (assets / "corpora" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    path = assets / "corpora" / "lambada" / "lambada_test.jsonl"
    return "\n\n".join(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines())


def _adversarial_texts() -> dict[str, str]:
    """Texts that put whitespace runs, '\\r\\n', digits, contractions, CJK and emoji next to the
    candidate cuts, plus o200k's '.\\n/' (one pre-token across a newline) and no whitespace at all."""
    rng = random.Random(0)
    fragments = ["word", "Hello", " ", " ", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", " \t ", "\r\n",
                 "\r\n\r\n", "12345", "3.14", "2024", "'s", "'ll", "n't", "’s", "!", "?!", "...", "(", ")",
                 "/", "\n/", ".\n/", "-\n", "日本語", "のテキスト", "🤗", "🧪🧪", "é", "e\u0301", "\u00a0",
                 "\u3000", "\x1c", "\u200b", "<|endoftext|>", "ÄÖÜß", "_", "#", " =", " @-@ "]
    words = ["the", "a", "of", "token", "Perplexity", "naïve", "x", "42", "don't", "It's", "日本", "🤗"]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\n "]
    return {
        "fragments": "".join(rng.choice(fragments) for _ in range(6000)),
        "words_and_runs": "".join(rng.choice(words) + rng.choice(seps) for _ in range(4000)),
        "no_whitespace": "".join(rng.choice(["abc", "123", "!?", "日本", "🤗", "'s"]) for _ in range(4000)),
        "one_line_single_spaces": " ".join(rng.choice(words) for _ in range(5000)),
        "newlines_only": "\n".join(rng.choice(words) for _ in range(5000)),
    }


@pytest.mark.parametrize("which", ["wikitext", "lambada"])
@pytest.mark.parametrize("spec", TIKTOKEN)
def test_encode_document_equals_encode_tiktoken(assets, spec, which):
    text = _corpus(assets, which)
    tok = _Recording(load_tokenizer(spec))
    ids = encode_document(tok, text, piece_chars=4000)
    assert isinstance(ids, array) and ids.typecode == "i"
    assert ids.tolist() == tok.tok.encode(text)
    pieces = [n for n in tok.calls if n > 2000]  # the rest: windows that verify a cut, the last piece
    assert len(pieces) >= len(text) // 4100 and max(pieces) <= 4100  # hundreds of cuts, all taken
    assert sum(pieces) > len(text) - 4000


@pytest.mark.parametrize("which", ["wikitext", "lambada"])
@pytest.mark.parametrize("spec", ["hf-gpt2", pytest.param("smollm2-gguf", marks=pytest.mark.slow)])
def test_encode_document_equals_encode_hf(spec, which, assets, request):
    tok = request.getfixturevalue({"hf-gpt2": "hf_gpt2", "smollm2-gguf": "smollm2"}[spec])
    text = _corpus(assets, which)[:300_000]
    assert encode_document(tok, text, piece_chars=3000).tolist() == tok.encode(text)


@pytest.mark.parametrize("name", list(_adversarial_texts()))
@pytest.mark.parametrize("spec", [*TIKTOKEN, "hf-gpt2"])
def test_encode_document_equals_encode_adversarial(spec, name, request, monkeypatch):
    """Also: the run-time check never has to refuse a candidate cut of these regex pre-tokenizers."""
    tok = request.getfixturevalue("hf_gpt2") if spec == "hf-gpt2" else load_tokenizer(spec)
    verdicts, check = [], lmloss.encode._cut_is_exact

    def recorded_check(*args):
        verdicts.append(check(*args))
        return verdicts[-1]

    monkeypatch.setattr(lmloss.encode, "_cut_is_exact", recorded_check)
    text = _adversarial_texts()[name]
    expected = tok.encode(text)
    for piece_chars in (50, 700):
        assert encode_document(tok, text, piece_chars=piece_chars).tolist() == expected, piece_chars
    assert all(verdicts) and (len(verdicts) > 100 or name == "no_whitespace")


def _trained_bpe(normalizer, pre_tokenizer, texts):
    """A small BPE with a SentencePiece-style '▁', trained here on `texts`."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.normalizer, rust.decoder = normalizer, decoders.Metaspace()
    if pre_tokenizer is not None:
        rust.pre_tokenizer = pre_tokenizer
    rust.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"],
                                                        show_progress=False))
    return load_tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>"))


def test_encode_document_refuses_cuts_a_dummy_prefix_would_change(assets):
    """Llama-2's form (a '▁' prepended to every call, BPE over the whole text, no pre-tokenizer):
    every cut changes the ids, so none is taken and the text is encoded in one call. Metaspace with
    prepend_scheme='always' prepends only where a piece does not start with a space: cuts at spaces
    are taken, cuts after a newline are refused."""
    from tokenizers import normalizers, pre_tokenizers

    rows = _corpus(assets, "lambada").split("\n\n")[:400]
    text = " ".join(rows)[:30_000]
    prepend = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama2 = _Recording(_trained_bpe(prepend, None, rows))
    assert encode_document(llama2, text, piece_chars=1000).tolist() == llama2.tok.encode(text)
    assert len(text) in llama2.calls  # every cut was refused: one call on the whole text

    metaspace = _Recording(_trained_bpe(None, pre_tokenizers.Metaspace(prepend_scheme="always"), rows))
    assert encode_document(metaspace, text, piece_chars=1000).tolist() == metaspace.tok.encode(text)
    assert max(metaspace.calls) < 1100  # cuts at single spaces are safe here
    lines = _adversarial_texts()["newlines_only"]
    metaspace.calls.clear()
    assert encode_document(metaspace, lines, piece_chars=1000).tolist() == metaspace.tok.encode(lines)
    assert len(lines) in metaspace.calls  # a piece starting after '\n' would gain a '▁'


def test_encode_document_short_text_and_arguments():
    tok = _Recording(load_tokenizer("gpt2"))
    assert encode_document(tok, "").tolist() == []
    assert encode_document(tok, "hello world").tolist() == [31373, 995]
    tok.calls.clear()
    text = "a b " * 25
    assert encode_document(tok, text, piece_chars=100).tolist() == tok.tok.encode(text)
    assert tok.calls == [100]  # up to piece_chars: one call, no verification
    assert encode_document("gpt2", "hello world").tolist() == [31373, 995]  # anything load_tokenizer takes
    with pytest.raises(ValueError, match="piece_chars"):
        encode_document(tok, text, piece_chars=0)
    with pytest.raises(TypeError, match="decode"):
        encode_document(tok, b"bytes")


_MEMORY_SCRIPT = r"""
import json, random, sys
from lmloss.encode import encode_document
from lmloss.tokenizers import load_tokenizer

def status_bytes(key):  # VmRSS: resident now; VmHWM: its peak since exec or the last reset
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

mode, n_chars, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tok = load_tokenizer(spec)
rng = random.Random(0)
pieces = (tok.decode([i]) for i in range(tok.vocab_size))
words = [w for w in pieces if w[0] == " " and w[1:].isascii() and w[1:].isalpha()]  # " the", ...
block = "".join(rng.choice(words) for _ in range(200_000))  # ~1.5 MB of single-token words
text = "".join([block] * (n_chars // len(block) + 1))[1:n_chars + 1]  # one line, single spaces
del block
tok.encode("warm up")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak := now, so that building the text above does not count
before = status_bytes("VmRSS")
ids = tok.encode(text) if mode == "encode" else encode_document(tok, text)
increase = status_bytes("VmHWM") - before
print(json.dumps({"text_bytes": len(text.encode()), "n_tokens": len(ids), "increase_bytes": increase}))
"""


def _peak_increase(mode: str, n_chars: int, spec: str) -> dict:
    """Peak RSS of a fresh process minus its RSS after building the text and loading the tokenizer.
    Not getrusage's ru_maxrss: in a child, Linux keeps there the peak of the forking process (pytest,
    ~1 GB after the GGUF tests) from before exec; /proc/self/status VmHWM counts this process only."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, str(n_chars), spec],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's /proc/self")
def test_encode_document_memory_is_a_small_multiple_of_the_text(assets):
    spec = str(assets / "tokenizers" / "hf-gpt2")
    old = _peak_increase("encode", 2_000_000, spec)  # whole-text encode: offsets etc. for every token
    assert old["increase_bytes"] > 20 * old["text_bytes"]  # so the bound below can fail
    new = _peak_increase("document", 20_000_000, spec)
    assert new["text_bytes"] == 20_000_000 and new["n_tokens"] > 2_000_000
    assert new["increase_bytes"] < 4 * new["text_bytes"], str(new)


# -- encode_documents: a corpus's pieces encoded in parallel batches ----------------------------------

class _BatchRecording(_Recording):
    """_Recording that also records the number of texts of each encode_batch call (the real tokenizer's
    parallel encode_batch does the work)."""

    def __init__(self, tok):
        super().__init__(tok)
        self.batches = []

    def encode_batch(self, texts):
        self.batches.append([len(t) for t in texts])
        return self.tok.encode_batch(texts)


@pytest.mark.parametrize("spec", ["gpt2", "o200k_base", "hf-gpt2"])
def test_encode_batch_equals_encode(spec, request, assets):
    tok = request.getfixturevalue("hf_gpt2") if spec == "hf-gpt2" else load_tokenizer(spec)
    texts = [*TRICKY, *list(_adversarial_texts().values())[:2], _corpus(assets, "wikitext")[:20_000]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize("spec", ["gpt2", "hf-gpt2"])
def test_encode_documents_equals_encode_per_document(spec, request, assets):
    """Pages of WikiText (some cut into pieces, empty ones among them) give each page's own ids, in
    order, whatever the batch size; the pieces go to encode_batch in batches of about batch_chars."""
    tok = _BatchRecording(request.getfixturevalue("hf_gpt2") if spec == "hf-gpt2" else load_tokenizer(spec))
    pages = _corpus(assets, "wikitext").split("\n = ")[:40]
    texts = ["", *pages[:20], "", *pages[20:], ""]
    expected = [tok.tok.encode(t) for t in texts]
    for batch_chars in (None, 5000, 1):
        tok.batches.clear()
        got = encode_documents(tok, texts, piece_chars=3000, batch_chars=batch_chars)
        assert all(isinstance(ids, array) and ids.typecode == "i" for ids in got)
        assert [ids.tolist() for ids in got] == expected, batch_chars
        pieces = [n for b in tok.batches for n in b]
        assert sum(pieces) == sum(map(len, texts)) and max(pieces) <= 3100  # cut pieces, all covered
        if batch_chars is None:
            assert len(tok.batches) <= -(-sum(pieces) // (4 * 3000)) + 1  # 4+ pieces' worth per call
        elif batch_chars == 5000:
            assert all(sum(b) - b[-1] < 5000 for b in tok.batches) and len(tok.batches) > 10
        else:
            assert all(sum(n > 0 for n in b) <= 1 for b in tok.batches)  # each piece fills a batch (empty pages join one)
    assert encode_documents(tok, []) == []


def test_encode_documents_arguments():
    with pytest.raises(TypeError, match="sequence of texts.*encode_document"):
        encode_documents("gpt2", "one text")
    with pytest.raises(TypeError, match="index 1.*decode"):
        encode_documents("gpt2", ["a", b"bytes"])
    with pytest.raises(ValueError, match="piece_chars"):
        encode_documents("gpt2", ["a"], piece_chars=0)
    with pytest.raises(ValueError, match="batch_chars"):
        encode_documents("gpt2", ["a"], batch_chars=0)
    assert [ids.tolist() for ids in encode_documents("gpt2", ["hello world", ""])] == [[31373, 995], []]
