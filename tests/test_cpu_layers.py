"""lmloss/ops/cpu_layers.py and its C passes (native.rms_norm, silu_mul, rope): against float64 formulas written
here on odd shapes, inside a Llama forward against the model's own, and the ways they step aside."""

import math

import pytest
import torch

from lmloss.ops import cpu_layers, native, onednn
from lmloss.ops.cpu_forward import cpu_forward

pytestmark = pytest.mark.skipif(not native.on_torch_threads(),
                                reason="needs the native C library on torch's OpenMP threads")


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(7, 577), (2, 3, 64), (1, 1)])
def test_rms_norm_against_float64(shape):
    x = torch.randn(*shape, generator=_g(0)) * 3
    w = torch.randn(shape[-1], generator=_g(1))
    keep = x.clone(), w.clone()
    got = native.rms_norm(x, w, 1e-5)
    x64 = x.double()
    want = w.double() * (x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, keep[0]) and torch.equal(w, keep[1])


@pytest.mark.parametrize("n", [1, 4095, 4097, 3 * 4096 + 17])
def test_silu_mul_against_float64(n):
    g = torch.randn(n, generator=_g(2)) * 12  # exp(-g) from ~e^-40 to ~e^40
    g[0] = -100.0  # exp(100) overflows float32: silu(-100) = -100 / inf = -0, as torch has it
    u = torch.randn(n, generator=_g(3))
    got = native.silu_mul(g, u)
    want = g.double() * torch.sigmoid(g.double()) * u.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-30)
    assert got[0] == 0


@pytest.mark.parametrize("B, Bc, H, T, D", [(2, 2, 3, 5, 10), (2, 1, 4, 7, 2), (1, 1, 1, 1, 64)])
def test_rope_bit_for_bit_transformers(B, Bc, H, T, D):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(B, T, H, D, generator=_g(4)).transpose(1, 2)  # a projection's (B, T, H, D) seen as (B, H, T, D)
    cos, sin = torch.randn(Bc, T, D, generator=_g(5)), torch.randn(Bc, T, D, generator=_g(6))
    got = native.rope(x, cos, sin)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)
    x64 = x.double()
    rot = torch.cat((-x64[..., D // 2:], x64[..., :D // 2]), -1)
    torch.testing.assert_close(got.double(), x64 * cos.double()[:, None] + rot * sin.double()[:, None])


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa", **kw)
    return LlamaForCausalLM(cfg).eval()


def test_llama_forward_takes_the_c_passes_and_gives_the_same_logits(monkeypatch):
    from transformers.models.llama import modeling_llama

    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 40), generator=_g(7))
    calls = {"rms_norm": 0, "silu_mul": 0, "rope": 0}
    for name in calls:
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    original_rope = modeling_llama.apply_rotary_pos_emb
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
        with cpu_forward(module=model):
            assert modeling_llama.apply_rotary_pos_emb is not original_rope
            got = model(input_ids=ids, use_cache=False).logits
    assert calls == {"rms_norm": 2 * 2 + 1, "silu_mul": 2, "rope": 2 * 2}  # 2 norms per layer + the final one
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # everything put back
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_nested_blocks_keep_the_routes_until_the_last_ends():
    from transformers.models.llama import modeling_llama

    model = _tiny_llama()
    original_rope = modeling_llama.apply_rotary_pos_emb
    with cpu_forward(module=model):
        with cpu_forward(module=model):
            pass
        assert "forward" in model.model.norm.__dict__ and modeling_llama.apply_rotary_pos_emb is not original_rope
    assert "forward" not in model.model.norm.__dict__ and modeling_llama.apply_rotary_pos_emb is original_rope
    block = cpu_forward(module=model)
    for _ in range(2):  # one cpu_forward object, entered twice in turn
        with block:
            assert "forward" in model.model.norm.__dict__
        assert "forward" not in model.model.norm.__dict__


def test_training_bfloat16_subclasses_and_other_replacements_untouched():
    """With autograd, in bfloat16, on a subclass of LlamaRMSNorm, or where a forward was already replaced,
    transformers' own code runs: gradients and numbers are the model's own, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 30), generator=_g(8))
    w = model.model.layers[0].self_attn.q_proj.weight
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    grad = torch.autograd.grad(loss, [w])[0]
    with cpu_forward(module=model):
        loss2 = model(input_ids=ids, labels=ids, use_cache=False).loss
        grad2 = torch.autograd.grad(loss2, [w])[0]
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)

    with torch.inference_mode():
        bf = _tiny_llama().to(torch.bfloat16)
        want = bf(input_ids=ids, use_cache=False).logits
        with cpu_forward(module=bf):
            assert torch.equal(bf(input_ids=ids, use_cache=False).logits, want)

    class MyNorm(LlamaRMSNorm):
        pass

    model.model.norm = MyNorm(64)
    custom = lambda self_, x: x  # noqa: E731
    model.model.layers[1].input_layernorm.forward = custom.__get__(model.model.layers[1].input_layernorm)
    with cpu_forward(module=model):
        assert "forward" not in model.model.norm.__dict__
        assert model.model.layers[1].input_layernorm.forward.__func__ is custom
    assert model.model.layers[1].input_layernorm.forward.__func__ is custom


def test_steps_aside_without_onednn_or_openmp(monkeypatch):
    model = _tiny_llama()
    monkeypatch.setattr(native, "_omp", False)
    with cpu_forward(module=model):
        assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(native, "_omp", True)
    torch.backends.mkldnn.enabled = False
    try:
        with cpu_forward(module=model):
            assert not any("forward" in m.__dict__ for m in model.modules())
    finally:
        torch.backends.mkldnn.enabled = True


def test_other_architectures_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (1, 20), generator=_g(9))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with cpu_forward(module=model):
            assert not any("forward" in m.__dict__ for m in model.modules())
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert math.isfinite(got.sum().item()) and onednn.available()


def _count_calls(monkeypatch):
    calls = {"rms_norm": 0, "silu_mul": 0, "rope": 0}
    for name in calls:
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    return calls


def test_architectures_with_llamas_code_take_the_same_passes(monkeypatch):
    """Qwen2's RMSNorm, MLP and RoPE are Llama's code, text for text: they take the C passes too. Gemma-3 shares
    only the RoPE (its RMSNorm scales by 1 + w, its MLP is GELU): only the RoPE does."""
    import sys

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**small)).eval()
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, **small)).eval()
    ids = torch.randint(0, 97, (2, 30), generator=_g(10))
    for model, want_calls in [(qwen, {"rms_norm": 5, "silu_mul": 2, "rope": 4}),
                              (gemma, {"rms_norm": 0, "silu_mul": 0, "rope": 4})]:
        calls = _count_calls(monkeypatch)
        modeling = sys.modules[type(model).__module__]
        original = modeling.apply_rotary_pos_emb
        with torch.inference_mode():
            want = model(input_ids=ids, use_cache=False).logits
            with cpu_forward(module=model):
                got = model(input_ids=ids, use_cache=False).logits
        assert calls == want_calls, type(model).__name__
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert modeling.apply_rotary_pos_emb is original
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_class_whose_code_differs_is_left_alone():
    """An RMSNorm whose forward is not Llama's text (here: one more line) keeps transformers' code."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class ScaledRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    model = _tiny_llama()
    model.model.norm = ScaledRMSNorm(64)
    with cpu_forward(module=model):
        assert "forward" not in model.model.norm.__dict__
        assert "forward" in model.model.layers[0].input_layernorm.__dict__
