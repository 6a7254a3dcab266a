"""Model loading: device and dtype, context length, the output head and its final-logit transform;
GGUF files checked before loading; configurations read without weights."""
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmloss.models import LoadedModel, ModelInfo, check_gguf, load_model, peek_config, resolve_device

SMOLLM2 = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BYTES = 98_362_432  # its size, and the end of its last tensor's data


def _gpt2(**kw):
    cfg = dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw}))


def test_wraps_a_module_in_eval_mode_with_context_and_head():
    model = load_model(_gpt2(), device="cpu")
    assert isinstance(model, LoadedModel) and not model.module.training
    assert model.context_length == 48 and model.vocab_size == 101 and model.device.type == "cpu"
    assert model.head is not None and model.head.softcap is None and model.notes == []
    ids = torch.randint(0, 101, (2, 9))
    with torch.inference_mode():
        want = model.module(ids).logits.double()
        got = model.head.logits(model.hidden_states(ids)).double()
        assert torch.allclose(model(ids).double(), want)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dtype_is_applied():
    model = load_model(_gpt2(), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.module.parameters())
    assert model.head is not None and model.head.weight.dtype == torch.bfloat16


def test_softcapping_is_read_from_the_config():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, final_logit_softcapping=3.0)
    model = load_model(Gemma2ForCausalLM(cfg), device="cpu")
    assert model.head is not None and model.head.softcap == 3.0
    ids = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        logits = model(ids).double()
        raw = torch.nn.functional.linear(model.hidden_states(ids), model.head.weight).double()
    assert logits.abs().max() <= 3.0
    assert torch.allclose(logits, 3.0 * torch.tanh(raw / 3.0), rtol=1e-5, atol=1e-5)


class _ScaledGPT2(GPT2LMHeadModel):
    """A model whose logits get a transform lmloss does not know about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_unknown_final_transform_falls_back_to_logits_with_a_note():
    model = load_model(_ScaledGPT2(_gpt2().config), device="cpu")
    assert model.head is None
    assert any("does not reproduce" in note for note in model.notes)


def test_devices():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")


@pytest.mark.parametrize("spec, kwargs, match", [
    ("no-such-org/no-such-model-lmloss", {},
     "(?s)could not load model .*tried the Hugging Face Hub name.*Offline, pass a local folder"),
    ("/nonexistent/model.gguf", {}, "GGUF file not found"),
    ("gpt2", {"dtype": "float8"}, "unknown dtype"),
])
def test_clear_errors(spec, kwargs, match, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time by huggingface_hub: patch it too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=match):
        load_model(spec, device="cpu", **kwargs)


def test_local_folder_loads(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert model.context_length == 48 and model.head is not None and model.name == str(tmp_path)


def test_unavailable_devices_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "cuda:1"):  # used to return torch.device(device): a traceback later
        with pytest.raises(ValueError, match=rf"device {device!r} is not available on this machine.*"
                                             r"cuda\.is_available\(\) is False.*--device cpu or --device auto"):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:1'.*this machine has 1 CUDA device \(cuda:0\).*--device cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'mps' is not available.*mps\.is_available\(\) is False.*--device cpu"):
        resolve_device("mps")


# -- GGUF files: checked before transformers sees them ------------------------------------------------

def _bad_gguf(case: str, real: Path, folder: Path) -> Path:
    """A prefix of the real file, random bytes (after b"GGUF" or not), or an empty file."""
    with real.open("rb") as f:
        prefix = f.read(50 * 2**20 if case == "half" else 1000)
    rng = random.Random(0)
    data = {"head": prefix, "half": prefix, "random": rng.randbytes(4096),
            "magic+random": b"GGUF" + rng.randbytes(4092), "empty": b""}[case]
    path = folder / (f"{case}.gguf" if case in ("head", "half") else "x.gguf")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, match", [
    # used to give struct.error from transformers' GGUF reader
    ("head", r"head\.gguf is truncated or not a GGUF file: .*file has 1000 bytes"),
    # used to give "cannot reshape array of size 58816 into shape (1536,360)"
    ("half", rf"half\.gguf is truncated or not a GGUF file: tensor .* ends at byte \d+.*re-download it "
             rf"\(expected size from its tensor table: {SMOLLM2_BYTES} bytes, file has {50 * 2**20}\)"),
    ("random", r"x\.gguf is truncated or not a GGUF file: it starts with b'.*', not b'GGUF'"),
    ("magic+random", r"x\.gguf is truncated or not a GGUF file: GGUF version \d+ is not one"),
    ("empty", r"x\.gguf is truncated or not a GGUF file: the file is empty; .*file has 0 bytes"),
])
def test_truncated_or_corrupt_gguf_is_named_before_loading(case, match, assets, tmp_path, monkeypatch):
    import transformers

    path = _bad_gguf(case, assets / SMOLLM2, tmp_path)
    with pytest.raises(ValueError, match=match):
        check_gguf(path)
    with pytest.raises(ValueError, match=match):
        peek_config(str(path))

    def not_reached(*args, **kwargs):
        raise AssertionError("transformers was asked to load a file check_gguf refuses")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_reached)
    with pytest.raises(ValueError, match=match):
        load_model(str(path), device="cpu")


def test_check_gguf_reads_the_metadata(assets, tmp_path):
    meta = check_gguf(assets / SMOLLM2)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 8192
    assert meta["llama.vocab_size"] == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["llama.rope.freq_base"] == 100000.0
    with pytest.raises(ValueError, match="GGUF file not found"):
        check_gguf(tmp_path / "missing.gguf")


# -- peek_config: the configuration without the weights ------------------------------------------------

def test_peek_config_agrees_with_load_model_for_a_folder_and_a_module(tiny_model):
    info = peek_config(tiny_model)
    loaded = load_model(tiny_model, device="cpu")
    assert info == ModelInfo(tiny_model, loaded.context_length, loaded.vocab_size)
    assert info == ModelInfo(tiny_model, 128, 50257)
    module = _gpt2()
    assert peek_config(module) == ModelInfo("GPT2LMHeadModel", 48, 101)
    assert load_model(module, device="cpu").name == "GPT2LMHeadModel"


def test_peek_config_of_a_gguf_reads_its_metadata(assets):
    path = str(assets / SMOLLM2)
    assert peek_config(path) == ModelInfo(path, 8192, 49152)


@pytest.mark.slow
def test_peek_config_agrees_with_load_model_for_a_gguf(assets):
    path = str(assets / SMOLLM2)
    loaded = load_model(path, device="cpu")
    assert peek_config(path) == ModelInfo(path, loaded.context_length, loaded.vocab_size)


def test_peek_config_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"(?s)could not read the configuration of model 'no-such-org/no-such-"
                                         r"model-lmloss'.*tried the Hugging Face Hub name.*Offline, pass a local"):
        peek_config("no-such-org/no-such-model-lmloss")
    for fn in (peek_config, load_model):
        with pytest.raises(ValueError, match=r"local folder .* has no config\.json; pass a folder written by"):
            fn(str(tmp_path))  # transformers said "Should have a `model_type` key in its config.json"
    with pytest.raises(ValueError, match="GGUF file not found"):
        peek_config(str(tmp_path / "nope.gguf"))
    with pytest.raises(TypeError, match="model must be a name, a path or a torch.nn.Module"):
        peek_config(3)
