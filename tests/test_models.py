"""Model loading: device and dtype, context length, the output head and its final-logit transform."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmloss.models import LoadedModel, load_model, resolve_device


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
