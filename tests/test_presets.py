"""The llama.cpp and GPTQ conventions (plan "chunks") and lm-eval's BOS rule, each against an
independent loop written here from the tool's description, on a tiny random GPT-2."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import lmloss
from lmloss.cli_eval_report import chunk_numbers
from lmloss.cli_options import bos_in_tokens
from lmloss.data import Document

VOCAB, BOS, EOS = 258, 256, 257
TEXT = ("The café at the corner opened in 1998. Its owner, Zoë, bakes naïve little cakes — and sells "
        "them for €3.\n\nTwo streets further, a bookshop keeps a shelf of old maps: 東京, Ålesund, "
        "Kraków. ") * 3

pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """Token ids are UTF-8 bytes; 256 is BOS, 257 EOS; add_bos as asked."""

    name, vocab_size, bos_id, eos_id, byte_exact = "bytes", VOCAB, BOS, EOS, True

    def __init__(self, add_bos=False):
        self.add_bos = add_bos

    def encode(self, text):
        return list(text.encode("utf-8"))

    def byte_lengths(self):
        return [1] * 256 + [0, 0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def _logp(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def llama_perplexity(model, tokens, n_ctx, n_chunks, add_bos):
    """llama.cpp's perplexity(): disjoint chunks of n_ctx tokens, BOS over each chunk's first token
    when the tokenizer adds BOS, logits j = n_ctx/2 .. n_ctx-2 scored against token j+1."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for k in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = list(tokens[k * n_ctx:(k + 1) * n_ctx])
        if add_bos:
            chunk[0] = BOS
        logp = _logp(model, chunk)
        for j in range(first, n_ctx - 1):
            nll -= logp[j, chunk[j + 1]].item()
            count += 1
    return nll, count


def llama_token_nlls(model, tokens, n_ctx, n_chunks, add_bos):
    out = []
    for k in range(n_chunks):
        chunk = list(tokens[k * n_ctx:(k + 1) * n_ctx])
        chunk[0] = BOS if add_bos else chunk[0]
        logp = _logp(model, chunk)
        out += [-logp[j, chunk[j + 1]].item() for j in range(n_ctx // 2, n_ctx - 1)]
    return out


def gptq_loop(model, tokens, seqlen):
    """GPTQ's llama.py eval: model(chunk) with labels = the chunk, loss * seqlen summed."""
    nsamples = len(tokens) // seqlen
    nlls, total = [], 0.0
    for i in range(nsamples):
        batch = torch.tensor([tokens[i * seqlen:(i + 1) * seqlen]])
        with torch.no_grad():
            logits = model(batch).logits.double()
        loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(loss * seqlen)
        total += loss.item() * (seqlen - 1)
    return math.exp((torch.stack(nlls).sum() / (nsamples * seqlen)).item()), total


@pytest.mark.parametrize("add_bos", [False, True])
def test_llama_cpp_convention_matches_an_independent_loop(model, add_bos):
    tok = ByteTokenizer(add_bos)
    doc = Document(TEXT)
    tokens = ([BOS] if add_bos else []) + tok.encode(TEXT)
    want_nll, want_count = llama_perplexity(model, tokens, n_ctx=32, n_chunks=5, add_bos=add_bos)
    result = lmloss.evaluate(model, tok, [doc], plan="chunks", max_length=32, score_from=16, max_chunks=5,
                             prefix_id=BOS if add_bos else None, bos_in_tokens=add_bos, progress=False)
    assert result.totals.n_tokens == want_count == 5 * 15
    assert result.totals.nll_nats == pytest.approx(want_nll, rel=1e-6)
    # bytes and characters: those of the scored tokens' text, found by offsets into the text
    raw = TEXT.encode("utf-8")
    lead = int(add_bos)
    spans = [raw[k * 32 + 17 - lead:(k + 1) * 32 - lead] for k in range(5)]
    assert result.totals.n_bytes == sum(len(s) for s in spans) == 75
    assert result.totals.n_chars == sum(sum(1 for c in s if c & 0xC0 != 0x80) for s in spans)
    assert result.totals.n_words == 0 and "word_perplexity" not in result.metrics()
    numbers = chunk_numbers(result)
    v = llama_token_nlls(model, tokens, 32, 5, add_bos)
    N, mean = len(v), sum(v) / len(v)
    spread = math.exp(mean) * math.sqrt((sum(x * x for x in v) / N - mean * mean) / (N - 1))
    assert numbers["ppl_uncertainty"] == pytest.approx(spread, rel=1e-5)
    running = numbers["running_ppl"]
    assert running[-1] == pytest.approx(result.totals.token_perplexity, rel=1e-12)
    first_chunk = llama_perplexity(model, tokens, n_ctx=32, n_chunks=1, add_bos=add_bos)
    assert running[0] == pytest.approx(math.exp(first_chunk[0] / first_chunk[1]), rel=1e-6)


def test_gptq_convention_matches_its_loop_and_reports_both_numbers(model):
    tok = ByteTokenizer(add_bos=True)  # a Llama-style tokenizer: its call puts BOS first, once
    tokens = [BOS] + tok.encode(TEXT)
    want_ppl, want_nll = gptq_loop(model, tokens, seqlen=48)
    result = lmloss.evaluate(model, tok, [Document(TEXT)], plan="chunks", max_length=48, bos_in_tokens=True,
                             progress=False)
    n_chunks = len(tokens) // 48
    assert result.totals.n_tokens == n_chunks * 47
    assert result.totals.nll_nats == pytest.approx(want_nll, rel=1e-6)
    numbers = chunk_numbers(result)
    assert numbers["gptq_ppl"] == pytest.approx(want_ppl, rel=1e-5)
    assert result.totals.token_perplexity == pytest.approx(want_ppl, rel=1e-6)


def lm_eval_rolling(model, tokens, max_length, prefix):
    """lm-evaluation-harness's loglikelihood_rolling for one document: disjoint windows of max_length
    predictions, the first from [prefix] + tokens, each later one fed the max_length tokens before
    its last prediction."""
    nll, done = 0.0, 0
    while done < len(tokens):
        n_pred = min(max_length, len(tokens) - done)
        end = done + n_pred
        if done == 0:
            inputs = [prefix] + tokens[:end - 1]
        else:
            inputs = tokens[end - 1 - max_length:end - 1]
        logp = _logp(model, inputs)
        for j, t in enumerate(tokens[done:end]):
            nll -= logp[len(inputs) - n_pred + j, t].item()
        done = end
    return nll


def test_lm_eval_with_bos_in_the_token_list_matches_its_rolling_loop(model):
    tok = ByteTokenizer(add_bos=True)
    text = TEXT[:150]
    tokens = [BOS] + tok.encode(text)  # add_bos_token=True: the encoded page starts with BOS
    want = lm_eval_rolling(model, tokens, max_length=40, prefix=BOS)
    result = lmloss.evaluate(model, tok, [Document(text)], plan="lm-eval", max_length=40, bos_in_tokens=True,
                             progress=False)
    assert result.totals.n_tokens == len(tokens)  # BOS is scored, predicted from the BOS prefix
    assert result.totals.nll_nats == pytest.approx(want, rel=1e-6)
    assert result.totals.n_bytes == len(text.encode("utf-8"))  # the page's bytes, BOS counts none
    without = lmloss.evaluate(model, tok, [Document(text)], plan="lm-eval", max_length=40, progress=False)
    assert without.totals.nll_nats != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("rule, adds, expected", [
    ("lm-eval", True, True), ("lm-eval", False, False), ("tokenizer", True, True), ("tokenizer", False, False),
    ("yes", False, True), ("no", True, False)])
def test_bos_rules(rule, adds, expected):
    on, why = bos_in_tokens(rule, ByteTokenizer(add_bos=adds))
    assert on is expected and why


def test_wikitext_raw_form_is_wiki_test_raw_byte_for_byte(assets):
    folder = assets / "corpora"
    raw = (folder / "wikitext-2-raw-v1" / "wiki.test.raw").read_bytes()
    docs = lmloss.load_corpus("wikitext", form="raw", data_dir=str(folder))
    assert len(docs) == 1 and docs[0].text.encode("utf-8") == raw


# --- SmolLM2-135M (GGUF) against llama.cpp's own llama-perplexity ---------------------------------
# llama-perplexity (llama.cpp 0c1e57098, from the llama-cpp-python 0.3.36 sdist, CPU, AVX2), -f wiki.test.raw
# -c 512 --chunks 20 -b 512: its running "[k]" values for k = 1, 2, on the Q4_1 file as shipped (Q4_1 x Q8_1
# dot products: activations rounded to 8 bits) and on the same weights dequantized to an F32 GGUF with
# llama-quantize --allow-requantize ... F32 (float32 arithmetic, as transformers runs the model).
LLAMA_CPP_Q4_1 = (13.0198, 21.3543)
LLAMA_CPP_F32 = (12.9550, 21.3732)


@pytest.mark.slow
def test_smollm2_llama_cpp_preset_matches_llama_perplexity_and_a_transformers_loop(smollm2, assets):
    model, tok = smollm2
    raw = (assets / "corpora" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    doc = lmloss.load_corpus("wikitext", form="raw", data_dir=str(assets / "corpora"))[0]
    assert doc.text == raw and tok.add_bos is False  # SmolLM2's GGUF: no BOS, so no BOS over the chunks
    result = lmloss.evaluate(model, tok, [doc], plan="chunks", max_length=512, score_from=256, max_chunks=2,
                             progress=False)
    running = chunk_numbers(result)["running_ppl"]
    # the independent loop: the HF tokenizer's own call on the whole file, chunks, logits 256..510
    ids = tok.hf(raw[:40_000])["input_ids"]  # 2 chunks of 512 lie well inside the first 40,000 characters
    assert ids[:1024] == list(tok.encode(raw)[:1024])
    nll, count = 0.0, 0
    for k in range(2):
        chunk = ids[k * 512:(k + 1) * 512]
        with torch.no_grad():
            logp = model.module(torch.tensor([chunk])).logits[0].double().log_softmax(-1)
        nll -= sum(logp[j, chunk[j + 1]].item() for j in range(256, 511))
        count += 255
        assert running[k] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.totals.n_tokens == count == 510
    for got, f32, q4 in zip(running, LLAMA_CPP_F32, LLAMA_CPP_Q4_1):
        assert got == pytest.approx(f32, rel=1e-4)  # same float32 arithmetic: to 4.7e-5 here
        assert got == pytest.approx(q4, rel=1e-2)  # llama.cpp's 8-bit activations move it 0.1-0.5%


def test_chunks_on_a_text_shorter_than_one_chunk_is_an_error(model):
    with pytest.raises(ValueError, match="a document needs at least max_length tokens"):
        lmloss.evaluate(model, ByteTokenizer(), [Document("too short")], plan="chunks", max_length=32, progress=False)
