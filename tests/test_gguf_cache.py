"""The GGUF cache (lmloss.gguf_cache): a cached load equals the uncached one bit for bit and is read
from the cache the second time; a changed file gets a new entry; a partial, corrupt or stale entry
is rebuilt, never trusted; cache=False leaves the cache folder alone; two writers both succeed; past
LMLOSS_CACHE_MAX_GB the least recently used entries go, never the fresh one nor one being read, and a
reader whose entry goes anyway converts again.
Most tests use a tiny llama GGUF with random float32 weights and a byte-level BPE tokenizer, written
here with the gguf package; the SmolLM2 check is marked slow."""
import json
import math
import multiprocessing
import os
import re
import shutil
import struct
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmloss import cache_folder, gguf_cache
from lmloss.cache_folder import cache_root
from lmloss.gguf_cache import gguf_fingerprint, load_cached
from lmloss.models import load_model
from lmloss.tokenizers import _load_hf, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMOLLM2 = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
IDS = torch.tensor([[1, 40, 77, 3, 261, 200, 9]])  # (B, T) ids of the tiny vocabulary (264 entries)
TEXTS = ["", "the cat in a hat", " leading  and trailing ", "naïve café 日本語 🤗", "<|im_start|> plain text"]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in which byte-level BPE vocabularies spell tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, *, seed: int = 0, d: int = 32, n_layers: int = 2, n_heads: int = 4,
                    n_kv_heads: int = 2, ffn: int = 48) -> Path:
    """A llama GGUF (tied embeddings, float32 tensors) with a 264-entry byte-level BPE vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_symbols(), *(m.replace(" ", "") for m in merges)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // n_heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # all float32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control, 1 = normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    kv = d * n_kv_heads // n_heads
    shapes = {"token_embd.weight": (len(tokens), d)}
    for i in range(n_layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                   f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                   f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                   f"blk.{i}.ffn_gate.weight": (ffn, d), f"blk.{i}.ffn_up.weight": (ffn, d),
                   f"blk.{i}.ffn_down.weight": (d, ffn)}
    shapes["output_norm.weight"] = (d,)
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_master(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_gguf(tiny_gguf_master, tmp_path) -> Path:
    """A private copy (tests change it), with the master's mtime."""
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    shutil.copy2(tiny_gguf_master, path)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def no_conversion(monkeypatch):
    """Any conversion fails from here on: whatever loads came from the cache."""
    def refuse(path, folder):
        raise AssertionError(f"{path} was converted again instead of read from the cache")

    def install():
        monkeypatch.setattr(gguf_cache, "_write_model", refuse)
        monkeypatch.setattr(gguf_cache, "_write_tokenizer", refuse)
        _load_hf.cache_clear()  # the in-process cache of tokenizers would hide a conversion
    return install


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS)  # (1, T, V)


def _entries(cache: Path, part: str = "model") -> list[Path]:
    return sorted(cache.glob(f"gguf/*/{part}"))


def _assert_same_model(got, want):
    assert got.dtype == want.dtype and got.context_length == want.context_length == 64
    assert got.vocab_size == want.vocab_size == 264 and got.name == want.name
    assert (got.head is None) == (want.head is None) and got.notes == want.notes
    got_sd, want_sd = got.module.state_dict(), want.module.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    assert torch.equal(_logits(got), _logits(want))


# -- a second load is read from the cache and equals the uncached load ------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_second_load_is_read_from_the_cache_and_equals_the_uncached_load(tiny_gguf, cache_dir, no_conversion,
                                                                          dtype):
    uncached = load_model(str(tiny_gguf), device="cpu", dtype=dtype, cache=False)
    assert not cache_dir.exists()
    first = load_model(str(tiny_gguf), device="cpu", dtype=dtype)
    [entry] = _entries(cache_dir)
    assert {"config.json", "model.safetensors", "manifest.json"} <= {p.name for p in entry.iterdir()}
    from safetensors import safe_open

    with safe_open(entry / "model.safetensors", "pt") as f:  # what the converter produced, whatever the dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["inputs"] == gguf_fingerprint(tiny_gguf) and manifest["part"] == "model"
    assert manifest["files"]["model.safetensors"]["size"] == (entry / "model.safetensors").stat().st_size
    no_conversion()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cache entry")  # read as it is, not rebuilt
        second = load_model(str(tiny_gguf), device="cpu", dtype=dtype)
    assert _entries(cache_dir) == [entry]
    for model in (first, second):
        _assert_same_model(model, uncached)
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_tokenizer_is_cached_and_equals_the_uncached_one(tiny_gguf, cache_dir, no_conversion):
    uncached = load_tokenizer(str(tiny_gguf), cache=False)
    assert not cache_dir.exists()
    first = load_tokenizer(str(tiny_gguf))
    [entry] = _entries(cache_dir, "tokenizer")
    assert (entry / "tokenizer.json").is_file() and (entry / "manifest.json").is_file()
    no_conversion()
    second = load_tokenizer(str(tiny_gguf))
    for tok in (first, second):
        assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.byte_exact) == \
            ("tiny.gguf", 264, 1, 2, False, True)
        assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.byte_exact) == \
            (uncached.name, uncached.vocab_size, uncached.bos_id, uncached.eos_id, uncached.add_bos,
             uncached.byte_exact)
        assert tok.byte_lengths() == uncached.byte_lengths()
        assert all(tok.encode(t) == uncached.encode(t) for t in TEXTS)
    assert uncached.encode("the") == [119, 260]  # "t" + the merged "he": the tokenizer is not trivial


# -- a changed file is never served from a stale entry ----------------------------------------------

def _set_output_norm(path: Path, value: float) -> None:
    """Overwrite output_norm.weight[0] in place: every logit changes, the size does not."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    [tensor] = [t for t in reader.tensors if t.name == "output_norm.weight"]
    offset = int(tensor.data_offset)
    del reader
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", value))


@pytest.mark.parametrize("change", ["tensor bytes, same size and mtime", "mtime only", "one byte appended"])
def test_a_changed_file_gets_a_new_entry(tiny_gguf, cache_dir, change):
    before = load_model(str(tiny_gguf), device="cpu")
    [old_entry] = _entries(cache_dir)
    stat = tiny_gguf.stat()
    if change == "tensor bytes, same size and mtime":
        _set_output_norm(tiny_gguf, 5.0)
        os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert tiny_gguf.stat().st_mtime_ns == stat.st_mtime_ns and tiny_gguf.stat().st_size == stat.st_size
    elif change == "mtime only":
        os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        with open(tiny_gguf, "ab") as f:
            f.write(b"\0")  # past the last tensor: still a valid GGUF file
    after = load_model(str(tiny_gguf), device="cpu")
    entries = _entries(cache_dir)
    assert len(entries) == 2 and old_entry in entries
    _assert_same_model(after, load_model(str(tiny_gguf), device="cpu", cache=False))
    assert torch.equal(_logits(after), _logits(before)) == (change != "tensor bytes, same size and mtime")


def test_the_key_covers_size_mtime_header_and_both_ends_of_the_data(tiny_gguf):
    inputs = gguf_fingerprint(tiny_gguf)
    assert inputs["size"] == tiny_gguf.stat().st_size and inputs["mtime_ns"] == tiny_gguf.stat().st_mtime_ns
    assert inputs["format"] == gguf_cache.FORMAT and inputs["transformers"] and inputs["gguf"]
    data = bytearray(tiny_gguf.read_bytes())
    for where in (data.index(b"tiny"), len(data) - 1):  # general.name in the header; the last data byte
        changed = data.copy()
        changed[where] ^= 0x01
        tiny_gguf.write_bytes(changed)
        os.utime(tiny_gguf, ns=(inputs["mtime_ns"], inputs["mtime_ns"]))
        assert gguf_fingerprint(tiny_gguf)["head_sha256"] != inputs["head_sha256"]


# -- partial, corrupt or stale entries are rebuilt, not trusted --------------------------------------

def _corrupt(entry: Path, case: str, monkeypatch) -> None:
    manifest = entry / "manifest.json"
    weights = entry / "model.safetensors"
    if case == "no manifest (a half-written entry)":
        manifest.unlink()
    elif case == "manifest not JSON":
        manifest.write_text('{"format": 1, "files": {"model.saf')
    elif case == "manifest of another file":
        data = json.loads(manifest.read_text())
        data["inputs"]["mtime_ns"] += 1
        manifest.write_text(json.dumps(data))
    elif case == "config.json missing":
        (entry / "config.json").unlink()
    elif case == "config.json edited":
        config = json.loads((entry / "config.json").read_text())
        (entry / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    elif case == "weights truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    elif case == "weights unreadable, same size":  # big files are checked by size only: read() fails
        monkeypatch.setattr(gguf_cache, "_HASHED_FILE_BYTES", 0)
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 16)  # the safetensors header length and the start of its JSON
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", ["no manifest (a half-written entry)", "manifest not JSON",
                                  "manifest of another file", "config.json missing", "config.json edited",
                                  "weights truncated", "weights unreadable, same size"])
def test_a_partial_or_corrupt_entry_is_rebuilt(tiny_gguf, cache_dir, monkeypatch, case):
    want = load_model(str(tiny_gguf), device="cpu", cache=False)
    load_model(str(tiny_gguf), device="cpu")
    [entry] = _entries(cache_dir)
    _corrupt(entry, case, monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"cache entry .* is unusable, rebuilding it"):
        got = load_model(str(tiny_gguf), device="cpu")
    _assert_same_model(got, want)
    assert _entries(cache_dir) == [entry]
    assert gguf_cache._problem(entry, "model", gguf_fingerprint(tiny_gguf)) is None
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]


def test_a_killed_writer_leaves_no_entry(tiny_gguf, cache_dir, monkeypatch):
    """A writer that dies mid-way (here: raises) publishes nothing; what a killed process leaves
    (a .tmp-* folder) is never read, and is removed once it is an hour old."""
    real = gguf_cache._write_model

    def dies(path, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_write_model", dies)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_gguf), device="cpu")
    assert _entries(cache_dir) == [] and list((cache_dir / "gguf").iterdir()) == []
    old, recent = cache_dir / "gguf" / ".tmp-model-old", cache_dir / "gguf" / ".tmp-model-recent"
    for left in (old, recent):  # as SIGKILL leaves them
        left.mkdir()
        (left / "model.safetensors").write_bytes(b"half")
    two_hours_ago = (old.stat().st_mtime - 7200) * 1e9
    for p in (old / "model.safetensors", old):
        os.utime(p, ns=(int(two_hours_ago), int(two_hours_ago)))
    monkeypatch.setattr(gguf_cache, "_write_model", real)
    _assert_same_model(load_model(str(tiny_gguf), device="cpu"), load_model(str(tiny_gguf), device="cpu", cache=False))
    assert not old.exists() and recent.exists()  # a recent one may belong to a live writer


def test_a_file_changed_during_conversion_is_not_cached(tiny_gguf, cache_dir, monkeypatch):
    real = gguf_cache._write_model

    def touching(path, folder):
        real(path, folder)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    monkeypatch.setattr(gguf_cache, "_write_model", touching)
    with pytest.raises(ValueError, match="changed while it was converted; load it again"):
        load_model(str(tiny_gguf), device="cpu")
    assert _entries(cache_dir) == []


def test_a_writer_that_loses_the_race_uses_the_winners_entry(tiny_gguf, cache_dir, monkeypatch):
    """Another process publishes the entry while this one converts: this rename fails, and the
    winner's entry is used."""
    real = gguf_cache._write_model
    raced = []

    def racing(path, folder):
        monkeypatch.setattr(gguf_cache, "_write_model", real)
        load_cached(path, "model", lambda entry: raced.append(entry))  # the other process, done first
        real(path, folder)

    monkeypatch.setattr(gguf_cache, "_write_model", racing)
    got = load_model(str(tiny_gguf), device="cpu")
    assert _entries(cache_dir) == raced
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]
    _assert_same_model(got, load_model(str(tiny_gguf), device="cpu", cache=False))


def _load_in_a_process(path: str, cache: str, barrier, results) -> None:
    os.environ["LMLOSS_CACHE_DIR"] = cache
    torch.set_num_threads(1)  # as in the parent (one_thread): the thread count changes float sums
    from lmloss.models import load_model as load

    barrier.wait()
    model = load(path, device="cpu")
    with torch.inference_mode():
        results.put(model(IDS).numpy().tobytes())


@pytest.mark.slow  # two fresh interpreters import torch and transformers
def test_two_processes_converting_at_once_both_succeed(tiny_gguf, cache_dir):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_in_a_process, args=(str(tiny_gguf), str(cache_dir), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    want = _logits(load_model(str(tiny_gguf), device="cpu", cache=False)).numpy().tobytes()
    assert got == [want, want]
    assert len(_entries(cache_dir)) == 1
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]


# -- where the cache lives, and when it is left alone ------------------------------------------------

def test_cache_false_never_touches_the_cache_folder(tiny_gguf, cache_dir):
    load_model(str(tiny_gguf), device="cpu", cache=False)
    load_tokenizer(str(tiny_gguf), cache=False)
    assert not cache_dir.exists()


def test_a_truncated_file_is_refused_before_anything_is_written(tiny_gguf, cache_dir):
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"tiny\.gguf is truncated or not a GGUF file"):
        load_model(str(tiny_gguf), device="cpu")
    with pytest.raises(ValueError, match=r"tiny\.gguf"):
        load_tokenizer(str(tiny_gguf))
    assert not cache_dir.exists()


def test_an_unwritable_cache_folder_says_how_to_fix_it(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"could not write the cache entry .*set LMLOSS_CACHE_DIR to a writable "
                                         r"folder, or load with cache=False"):
        load_model(str(tiny_gguf), device="cpu")
    with pytest.raises(ValueError, match=r"could not write the cache entry") as err:
        load_tokenizer(str(tiny_gguf))  # the cache's own error, not wrapped as a damaged GGUF file
    assert "corrupt" not in str(err.value)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LMLOSS_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "lmloss"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lmloss"


def test_entries_go_to_lmloss_cache_dir_and_never_to_home(tiny_gguf, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_model(str(tiny_gguf), device="cpu")
    load_tokenizer(str(tiny_gguf))
    assert len(_entries(cache_dir)) == len(_entries(cache_dir, "tokenizer")) == 1
    assert not (tmp_path / "home" / ".cache" / "lmloss").exists()


def test_the_test_suite_caches_outside_home():
    """conftest.py points LMLOSS_CACHE_DIR into the checkout, so tests never fill ~/.cache."""
    root = cache_root().resolve()
    assert os.environ.get("LMLOSS_CACHE_DIR")
    assert not root.is_relative_to((Path.home() / ".cache").resolve())


# -- the real file ----------------------------------------------------------------------------------

@pytest.mark.slow  # dequantizes SmolLM2-135M (~25 s) for the uncached load, and once for the cache
def test_smollm2_cached_load_is_bit_identical(assets):
    path = str(assets / SMOLLM2)
    uncached = load_model(path, device="cpu", cache=False)
    cached = load_model(path, device="cpu")  # the test suite's cache folder: converted on its first run
    ids = torch.tensor([[1, 504, 3458, 28, 253, 1345, 30, 42, 9000]])
    with torch.inference_mode():
        assert torch.equal(cached(ids), uncached(ids))
    assert (cached.context_length, cached.vocab_size) == (uncached.context_length, uncached.vocab_size)
    tok, want = load_tokenizer(path), load_tokenizer(path, cache=False)
    assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == \
        (want.name, want.vocab_size, want.bos_id, want.eos_id, want.add_bos)
    assert tok.byte_lengths() == want.byte_lengths()
    text = (assets / "corpora" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")[:100_000]
    assert all(tok.encode(t) == want.encode(t) for t in [*TEXTS, text])


# -- the size limit: least recently used entries go, the fresh one stays -----------------------------

def _tiny_copies(tiny_gguf_master, tmp_path, n: int) -> list[Path]:
    """n GGUF files that differ (seeds 1..n) and have the same size: entries of equal size."""
    folder = tmp_path / "more"
    folder.mkdir()
    return [write_tiny_gguf(folder / f"tiny{i}.gguf", seed=i) for i in range(1, n + 1)]


def _set_last_use(entry: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    (entry / ".used").touch()
    os.utime(entry / ".used", (t, t))


def _model_entries(cache: Path) -> dict[str, Path]:
    """{source file name: entry folder} of the model entries."""
    return {cache_folder.describe(e).source.rsplit("/", 1)[-1]: e for e in _entries(cache)}


def test_each_load_records_its_use(tiny_gguf, cache_dir, no_conversion):
    load_model(str(tiny_gguf), device="cpu")
    [entry] = _entries(cache_dir)
    assert (entry / ".used").is_file() and ".used" not in json.loads((entry / "manifest.json").read_text())["files"]
    _set_last_use(entry, 2 * 86400)
    [listed] = [e for e in cache_folder.cache_entries() if e.part == "model"]
    assert listed.folder == entry and time.time() - listed.last_use_s > 86400
    no_conversion()
    before_s = time.time()
    load_model(str(tiny_gguf), device="cpu")
    [listed] = [e for e in cache_folder.cache_entries() if e.part == "model"]
    assert listed.last_use_s >= before_s - 1  # the file system's clock may be coarser than time.time()
    assert listed.source == str(tiny_gguf) and listed.n_bytes == sum(f.stat().st_size for f in entry.iterdir())


def test_eviction_goes_by_last_use_not_by_creation(tiny_gguf_master, tmp_path, cache_dir, monkeypatch):
    a, b, c = _tiny_copies(tiny_gguf_master, tmp_path, 3)
    load_model(str(a), device="cpu")
    load_model(str(b), device="cpu")
    entries = _model_entries(cache_dir)
    _set_last_use(entries["tiny1.gguf"], 300)  # written first,
    _set_last_use(entries["tiny2.gguf"], 200)
    load_model(str(a), device="cpu")  # ... but used last: read from the cache, which records the use
    n_bytes = cache_folder.describe(entries["tiny1.gguf"]).n_bytes
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", str(2.5 * n_bytes / 1e9))  # room for two of the three
    load_model(str(c), device="cpu")
    assert sorted(_model_entries(cache_dir)) == ["tiny1.gguf", "tiny3.gguf"]
    assert not entries["tiny2.gguf"].parent.exists()  # its key folder went with its only part
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]


def test_the_limit_holds_after_every_write(tiny_gguf_master, tmp_path, cache_dir, monkeypatch):
    files = _tiny_copies(tiny_gguf_master, tmp_path, 5)
    load_model(str(files[0]), device="cpu")
    n_bytes = cache_folder.describe(_entries(cache_dir)[0]).n_bytes
    max_bytes = 2.5 * n_bytes
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", str(max_bytes / 1e9))
    for i, path in enumerate(files[1:], start=2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no entry alone is over the limit: no warning
            load_model(str(path), device="cpu")
        entries = cache_folder.cache_entries()
        assert sum(e.n_bytes for e in entries) <= max_bytes and len(entries) == 2
        assert {Path(e.source).name for e in entries} == {f"tiny{i - 1}.gguf", f"tiny{i}.gguf"}  # the newest two


def test_the_fresh_entry_stays_even_alone_over_the_limit(tiny_gguf, tiny_gguf_master, tmp_path, cache_dir,
                                                         monkeypatch):
    [other] = _tiny_copies(tiny_gguf_master, tmp_path, 1)
    load_tokenizer(str(tiny_gguf))  # a small entry, written under the default limit
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", "1e-9")  # 1 byte
    want = load_model(str(tiny_gguf), device="cpu", cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_model(str(tiny_gguf), device="cpu")
    [warning] = [w for w in caught if "LMLOSS_CACHE_MAX_GB" in str(w.message)]  # once
    assert re.search(r"tiny\.gguf holds 0\.00 GB, more than LMLOSS_CACHE_MAX_GB=1e-09 allows; it is kept until the "
                     r"next entry is written .* Set LMLOSS_CACHE_MAX_GB above 1 to keep it", str(warning.message))
    _assert_same_model(got, want)
    assert [e.part for e in cache_folder.cache_entries()] == ["model"]  # the tokenizer went, the fresh entry stayed
    with pytest.warns(RuntimeWarning, match="LMLOSS_CACHE_MAX_GB"):
        load_model(str(other), device="cpu")
    assert list(_model_entries(cache_dir)) == ["tiny1.gguf"]


def test_limit_zero_keeps_nothing_new_and_still_reads_what_is_there(tiny_gguf, tiny_gguf_master, tmp_path,
                                                                      cache_dir, monkeypatch, no_conversion):
    [other] = _tiny_copies(tiny_gguf_master, tmp_path, 1)
    load_model(str(tiny_gguf), device="cpu")
    [entry] = _entries(cache_dir)
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", "0")
    _assert_same_model(load_model(str(other), device="cpu"), load_model(str(other), device="cpu", cache=False))
    assert load_tokenizer(str(other)).encode("the cat") == load_tokenizer(str(other), cache=False).encode("the cat")
    assert _entries(cache_dir) == [entry] and _entries(cache_dir, "tokenizer") == []
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]  # the conversions are gone
    no_conversion()
    load_model(str(tiny_gguf), device="cpu")  # the entry already there is read, not removed
    assert _entries(cache_dir) == [entry]


@pytest.mark.parametrize("value, max_bytes", [("", 20e9), ("0", 0.0), (" 0.5 ", 0.5e9), ("1e-3", 1e6),
                                              ("inf", math.inf)])
def test_the_limit_is_read_from_the_environment(monkeypatch, value, max_bytes):
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", value)
    assert gguf_cache.cache_max_bytes() == max_bytes
    monkeypatch.delenv("LMLOSS_CACHE_MAX_GB")
    assert gguf_cache.cache_max_bytes() == gguf_cache.DEFAULT_MAX_GB * 1e9 == 20e9


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "20GB", "-inf"])
def test_a_bad_limit_says_what_was_expected_before_anything_is_written(tiny_gguf, cache_dir, monkeypatch, value):
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match=rf"LMLOSS_CACHE_MAX_GB='{re.escape(value)}' is not a size in gigabytes: "
                                         r"expected a number >= 0 such as 20 or 0\.5 .* or unset it for the default "
                                         r"of 20"):
        load_model(str(tiny_gguf), device="cpu")
    with pytest.raises(ValueError, match=rf"LMLOSS_CACHE_MAX_GB='{re.escape(value)}' is not a size") as err:
        load_tokenizer(str(tiny_gguf))
    assert "corrupt" not in str(err.value)  # not wrapped as a damaged file
    assert not cache_dir.exists()


# -- eviction and concurrent readers ----------------------------------------------------------------

def _fake_entry(cache: Path, name: str, part: str, n_bytes: int, used_s_ago: float, *, old: bool = False) -> Path:
    """An entry's files without a conversion: n_bytes of weights, a manifest naming the source, and its
    last use (old: as an lmloss without .used files wrote it, the manifest's mtime)."""
    folder = cache / "gguf" / f"{name}-{'0' * 24}" / part
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * n_bytes)
    (folder / "manifest.json").write_text(json.dumps({"source": f"/models/{name}.gguf", "part": part}))
    if old:
        t = time.time() - used_s_ago
        os.utime(folder / "manifest.json", (t, t))
    else:
        _set_last_use(folder, used_s_ago)
    return folder


def test_evict_removes_least_recently_used_first_and_never_keep(cache_dir):
    first = _fake_entry(cache_dir, "first", "model", 1000, used_s_ago=10)  # written first, used last
    second = _fake_entry(cache_dir, "second", "model", 1000, used_s_ago=300)
    third = _fake_entry(cache_dir, "third", "model", 1000, used_s_ago=200, old=True)
    token = _fake_entry(cache_dir, "second", "tokenizer", 1000, used_s_ago=100)
    sizes = {e.folder: e.n_bytes for e in cache_folder.cache_entries()}
    assert [e.folder for e in cache_folder.cache_entries()] == [second, third, token, first]
    assert [e.folder for e in cache_folder.evict(sum(sizes.values()) - 1)] == [second]
    assert second.parent.exists()  # its tokenizer is still there
    assert cache_folder.evict(math.inf) == [] and cache_folder.evict(sum(sizes.values())) == []
    assert [e.folder for e in cache_folder.evict(0, keep=third)] == [token, first]
    assert [e.folder for e in cache_folder.cache_entries()] == [third]
    assert sorted(p.name for p in (cache_dir / "gguf").iterdir()) == [third.parent.name]


def test_an_entry_being_read_is_never_evicted(cache_dir):
    busy = _fake_entry(cache_dir, "busy", "model", 1000, used_s_ago=300)
    idle = _fake_entry(cache_dir, "idle", "model", 1000, used_s_ago=10)
    with cache_folder.reading(busy) as found:
        assert found
        assert [e.folder for e in cache_folder.evict(0)] == [idle]
        assert cache_folder.remove_entry(busy) is False and (busy / "model.safetensors").is_file()
    assert [e.folder for e in cache_folder.evict(0)] == [busy]
    assert cache_folder.remove_entry(busy) is False and list((cache_dir / "gguf").iterdir()) == []
    with cache_folder.reading(busy) as found:  # no entry: nothing is created
        assert not found
    assert list((cache_dir / "gguf").iterdir()) == []


def _open_files() -> list[str]:
    """The paths of this process's open file descriptors (Linux)."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile, e.g. the descriptor listdir used
            continue
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches /proc/self/fd")
def test_a_reader_that_waited_for_an_eviction_converts_again(tiny_gguf, cache_dir, monkeypatch):
    """An evictor holds the entry's lock when the reader opens it: the reader waits, then finds the
    entry gone and converts the file again, without a warning."""
    import fcntl

    want = load_model(str(tiny_gguf), device="cpu", cache=False)
    load_model(str(tiny_gguf), device="cpu")
    [entry] = _entries(cache_dir)
    used = entry / ".used"
    evicted = threading.Event()
    real, converted = gguf_cache._write_model, []
    monkeypatch.setattr(gguf_cache, "_write_model", lambda path, folder: (converted.append(path), real(path, folder)))

    def evictor():
        fd = os.open(used, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for _ in range(6000):  # until the reader has opened .used too (it then waits on the lock)
                if sum(1 for p in _open_files() if p.endswith("/model/.used")) >= 2:
                    break
                time.sleep(0.01)
            os.rename(entry, cache_dir / "gguf" / ".trash-test")  # as remove_entry does
            evicted.set()
        finally:
            os.close(fd)

    thread = threading.Thread(target=evictor)
    thread.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_model(str(tiny_gguf), device="cpu")
    thread.join(timeout=120)
    assert evicted.is_set() and converted == [tiny_gguf]
    _assert_same_model(got, want)
    assert _entries(cache_dir) == [entry] and gguf_cache._problem(entry, "model", gguf_fingerprint(tiny_gguf)) is None


def test_a_reader_whose_entry_is_deleted_mid_read_converts_again(tiny_gguf, cache_dir, monkeypatch):
    """A deletion that ignores the lock (rm -rf; a file system without locks) between the checks and
    read(): the read fails, and the reader warns and converts again instead of crashing."""
    import lmloss.models

    want = load_model(str(tiny_gguf), device="cpu", cache=False)
    load_model(str(tiny_gguf), device="cpu")
    [entry] = _entries(cache_dir)
    real = lmloss.models._from_pretrained
    deleted = []

    def deleting(spec, dtype, **extra):
        if Path(spec) == entry and not deleted:
            shutil.rmtree(entry)
            deleted.append(spec)
        return real(spec, dtype, **extra)

    monkeypatch.setattr(lmloss.models, "_from_pretrained", deleting)
    with pytest.warns(RuntimeWarning, match=r"cache entry .* was deleted while this process read it .* converting "
                                            r"the file again"):
        got = load_model(str(tiny_gguf), device="cpu")
    assert deleted
    _assert_same_model(got, want)
    assert _entries(cache_dir) == [entry] and gguf_cache._problem(entry, "model", gguf_fingerprint(tiny_gguf)) is None
