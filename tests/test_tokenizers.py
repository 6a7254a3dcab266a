"""Tokenizers: plain-text encoding and exact UTF-8 byte accounting, checked on real tokenizers and on
a small SentencePiece-style tokenizer built here with hand-computed byte lengths."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmloss.tokenizers import (HFTokenizer, check_byte_lengths, load_tokenizer,
                               token_byte_lengths)

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
