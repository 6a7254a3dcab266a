"""lmloss/ops/cpu_attention.py and cpu_forward.py: causal attention on oneDNN + the C softmax against a float64
attention written here, and the model forward routed through both against the model's own forward."""

import math

import pytest
import torch

from lmloss.ops import cpu_attention, native, onednn
from lmloss.ops.cpu_forward import cpu_forward

pytestmark = pytest.mark.skipif(not (onednn.available() and native.available()),
                                reason="needs oneDNN and the native C library")


def _ref(q, k, v, scale=None, window=None):
    """softmax(scale q k^T, causal) v in float64, grouped heads repeated, the mask written out; with a window,
    row i sees only the keys i - window < j <= i."""
    H, Hk, T = q.shape[1], k.shape[1], q.shape[2]
    k64 = k.double().repeat_interleave(H // Hk, dim=1)
    v64 = v.double().repeat_interleave(H // Hk, dim=1)
    s = q.double() @ k64.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    if window is not None:
        hidden |= torch.ones(T, T, dtype=torch.bool).tril(-window)
    s = s.masked_fill(hidden, -math.inf)
    return torch.softmax(s, -1) @ v64


def _qkv(B, H, Hk, T, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, T, H, D) memory seen as (B, H, T, D), as a transformers model hands them over
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = (2 * torch.randn(B, T, Hk, D, generator=g)).transpose(1, 2)
    v = torch.randn(B, T, Hk, Dv or D, generator=g).transpose(1, 2)
    return q, k, v


@pytest.fixture(params=["fused", "blocks"])
def path(request, monkeypatch):
    """Each test on both implementations: the fused C call (where the library has it) and the oneDNN blocks."""
    if request.param == "fused" and not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    if request.param == "blocks":
        monkeypatch.setattr(native, "attention_ready", lambda: False)
    return request.param


@pytest.mark.parametrize("B, H, Hk, T, D, Dv, scale", [(2, 9, 3, 600, 64, None, None), (1, 4, 4, 777, 32, None, 0.3),
                                                       (1, 2, 1, 520, 16, 24, None), (3, 1, 1, 513, 8, None, None),
                                                       (1, 6, 2, 545, 7, 130, None), (2, 2, 2, 1031, 128, 48, 0.05)])
def test_matches_float64_reference(B, H, Hk, T, D, Dv, scale, path):
    q, k, v = _qkv(B, H, Hk, T, D, Dv, seed=T)
    before = [t.clone() for t in (q, k, v)]
    assert cpu_attention.applies(q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hk)
    with torch.inference_mode():
        out = cpu_attention.causal(q, k, v, scale)
    assert out.shape == (B, H, T, Dv or D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref(q, k, v, scale), rtol=1e-5, atol=2e-5)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("T", [64, 65, 95, 96, 97, 200])
def test_fused_short_and_ragged(T):
    """The fused call on lengths around its tiles (24 query rows, 32 keys), down to FUSED_MIN_POSITIONS, with a
    query that is not contiguous in its last dimension and values read through their strides."""
    if not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    assert T >= cpu_attention.FUSED_MIN_POSITIONS
    q, k, v = _qkv(2, 4, 2, T, 40, seed=T)
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last-dimension stride T
    assert cpu_attention.applies(q, k, v, is_causal=True, enable_gqa=True)
    with torch.inference_mode():
        out = cpu_attention.causal(q, k, v)
    torch.testing.assert_close(out.double(), _ref(q, k, v), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_fused_redoes_only_the_rows_with_bad_scores(poison):
    """A NaN or infinite key poisons the scores of every row from its position on: exactly those rows come from
    SDPA (NaN where SDPA has NaN), the rows before it are the fused call's own numbers."""
    if not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    q, k, v = _qkv(1, 4, 2, 300, 16, seed=5)
    k = k.clone()
    k[0, 1, 250, 3] = float(poison)
    clean = k.clone()
    clean[0, 1, 250:] = 0
    with torch.inference_mode():
        ours = cpu_attention.causal(q, k, v)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        before = cpu_attention.causal(q, clean, v)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert ours[0, 2:, 250:].isnan().all() == (poison == "nan")  # -inf scores weigh 0, +inf ones give NaN
    assert torch.equal(ours[0, 2:, :250], before[0, 2:, :250]) and torch.equal(ours[0, :2], before[0, :2])
    torch.testing.assert_close(ours.nan_to_num(), theirs.nan_to_num(), rtol=1e-5, atol=2e-5)


def test_nan_where_sdpa_has_nan(path):
    """A NaN in one query row: its block is recomputed by SDPA, so NaN lands where SDPA puts it, nowhere else."""
    q, k, v = _qkv(1, 6, 2, 530, 16, seed=1)
    q = q.clone()
    q[0, 4, 300, 5] = float("nan")
    with torch.inference_mode():
        ours = cpu_attention.causal(q, k, v)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert ours.isnan().any() and torch.equal(ours.isnan(), theirs.isnan())
    torch.testing.assert_close(ours.nan_to_num(), theirs.nan_to_num(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["mask", "not causal", "dropout", "bfloat16", "short", "grad", "groups"])
def test_applies_only_where_it_should(case):
    q, k, v = _qkv(1, 4, 2, 520, 8)
    kw = dict(is_causal=True, enable_gqa=True)
    if case == "mask":
        kw["attn_mask"] = torch.ones(520, 520, dtype=torch.bool)
    elif case == "not causal":
        kw["is_causal"] = False
    elif case == "dropout":
        kw["dropout_p"] = 0.1
    elif case == "bfloat16":
        q, k, v = (t.bfloat16() for t in (q, k, v))
    elif case == "short":
        least = cpu_attention.FUSED_MIN_POSITIONS if native.attention_ready() else cpu_attention.MIN_POSITIONS
        q, k, v = _qkv(1, 4, 2, least - 1, 8)
    elif case == "grad":
        q.requires_grad_(True)
    else:
        kw["enable_gqa"] = False  # 4 query heads on 2 key/value heads without enable_gqa: SDPA's error to give
    assert not cpu_attention.applies(q, k, v, **kw)
    assert cpu_attention.applies(*_qkv(1, 4, 2, 520, 8), is_causal=True, enable_gqa=True)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_model_forward_routed_and_unchanged(monkeypatch, path):
    """A Llama forward inside cpu_forward: every linear layer and each layer's attention take the fast kernels,
    and the logits are the model's own to float32 summation order."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 520), generator=torch.Generator().manual_seed(1))
    calls = {"linear": 0, "attention": 0}
    real_linear, real_causal = onednn.linear, cpu_attention.causal

    def linear(*a, **kw):
        calls["linear"] += onednn.applies(*a, **kw)
        return real_linear(*a, **kw)

    def causal(*a, **kw):
        calls["attention"] += 1
        return real_causal(*a, **kw)

    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
        monkeypatch.setattr(onednn, "linear", linear)
        monkeypatch.setattr(cpu_attention, "causal", causal)
        with cpu_forward():
            got = model(input_ids=ids, use_cache=False).logits
    assert calls == {"linear": 2 * 7 + 1, "attention": 2}  # q k v o gate up down per layer, and the head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_forward_untouched():
    """With autograd on, cpu_forward leaves every call to torch: gradients are the model's own."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 520), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    grads = torch.autograd.grad(loss, [model.model.layers[0].self_attn.q_proj.weight])
    with cpu_forward():
        loss2 = model(input_ids=ids, labels=ids, use_cache=False).loss
        grads2 = torch.autograd.grad(loss2, [model.model.layers[0].self_attn.q_proj.weight])
    assert torch.equal(loss, loss2) and torch.equal(grads[0], grads2[0])


def test_off_when_the_user_turns_onednn_off():
    q, k, v = _qkv(1, 4, 2, 520, 8)
    torch.backends.mkldnn.enabled = False
    try:
        assert not cpu_attention.applies(q, k, v, is_causal=True, enable_gqa=True)
    finally:
        torch.backends.mkldnn.enabled = True
    assert cpu_attention.applies(q, k, v, is_causal=True, enable_gqa=True)


def test_blocks_where_the_library_has_no_avx512(tmp_path):
    """Built without AVX-512 (an AVX2 host, emulated by LMLOSS_NATIVE_CFLAGS=-mno-avx512f in a fresh process):
    no fused call, the blocks run and match the float64 reference."""
    import os
    import subprocess
    import sys

    code = """
import torch
from lmloss.ops import cpu_attention, native
assert native.available() and not native.attention_ready(), native.status()
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(1, 4, 520, 16, generator=g) for _ in range(3))
k, v = k[:, :2], v[:, :2]
assert cpu_attention.applies(q, k, v, is_causal=True, enable_gqa=True)
with torch.inference_mode():
    out = cpu_attention.causal(q, k, v)
ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                       enable_gqa=True)
torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
print("ok")
"""
    env = dict(os.environ, LMLOSS_NATIVE_CFLAGS="-mno-avx512f", LMLOSS_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _sliding_mask(B, T, window):
    """transformers' mask for a sliding-window layer: (B, 1, T, T) bool, True where row i sees key j."""
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return band[None, None].expand(B, 1, T, T)


@pytest.mark.parametrize("B, H, Hk, T, D, window", [(2, 4, 4, 1030, 64, 512), (1, 6, 2, 300, 40, 33),
                                                     (1, 2, 1, 200, 256, 1), (2, 3, 3, 97, 16, 96),
                                                     (1, 2, 2, 130, 32, 500)])
def test_sliding_window_matches_float64_reference(B, H, Hk, T, D, window):
    """A sliding-window layer's boolean mask (Gemma-3's) is read as its window, and the fused call computes it:
    against float64 with the band written out, and SDPA with the mask itself."""
    if not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    q, k, v = _qkv(B, H, Hk, T, D, seed=window)
    mask = _sliding_mask(B, T, window)
    assert cpu_attention.window_of(mask, q) == min(window, T)
    assert cpu_attention.applies(q, k, v, attn_mask=mask, enable_gqa=H != Hk)
    with torch.inference_mode():
        out = cpu_attention.causal(q, k, v, window=cpu_attention.window_of(mask, q))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hk)
    torch.testing.assert_close(out.double(), _ref(q, k, v, window=window), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=2e-5)


def test_window_of_reads_only_sliding_windows():
    """Masks that are not one causal band for every batch row give None (SDPA computes them); a mask changed in
    place after it was read is read again."""
    q = torch.zeros(2, 4, 100, 8)
    mask = _sliding_mask(2, 100, 10).clone()
    assert cpu_attention.window_of(mask, q) == 10
    assert cpu_attention.window_of(mask[0, 0], q) == 10  # (T, T), broadcast over batch and heads
    mask[1, 0, 50, 45] = False  # one batch row's mask differs (a padded key, say)
    assert cpu_attention.window_of(mask, q) is None
    assert cpu_attention.window_of(~torch.ones(100, 100, dtype=torch.bool).triu(1).logical_not(), q) is None
    assert cpu_attention.window_of(torch.ones(100, 100, dtype=torch.bool), q) is None  # not causal
    assert cpu_attention.window_of(torch.zeros(100, 100), q) is None  # an additive float mask: not read
    assert cpu_attention.window_of(_sliding_mask(2, 99, 10), q) is None  # another length
    assert not cpu_attention.applies(q, q, q, attn_mask=torch.ones(100, 100, dtype=torch.bool))


def test_sliding_window_is_sdpas_where_the_fused_call_is_not(monkeypatch):
    """Without the fused call (an AVX2 host), a sliding-window mask stays with SDPA, and causal() refuses a
    window rather than compute plain causal attention."""
    monkeypatch.setattr(native, "attention_ready", lambda: False)
    q, k, v = _qkv(1, 2, 2, 600, 16)
    mask = _sliding_mask(1, 600, 100)
    assert not cpu_attention.applies(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="sliding window"):
        cpu_attention.causal(q, k, v, window=100)


def test_gemma3_sliding_layers_routed_and_unchanged(monkeypatch):
    """A Gemma-3 forward (sliding-window layers with a boolean mask and expanded key/value heads, global
    layers causal with grouped heads) inside cpu_forward: every layer's attention takes the fused call, the
    logits are the model's own."""
    if not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=40,
                           max_position_embeddings=512, attn_implementation="sdpa",
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(4))
    windows = []
    real = native.attention

    def attention(*a, window=None, **kw):
        windows.append(window)
        return real(*a, window=window, **kw)

    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
        monkeypatch.setattr(native, "attention", attention)
        with cpu_forward(module=model):
            got = model(input_ids=ids, use_cache=False).logits
    assert windows == [40, 40, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 11, 13, 25, 33])
@pytest.mark.parametrize("window", [None, 1, 3, 30])
def test_fused_below_one_tile(T, window):
    """causal() called directly on lengths under one tile (24 query rows, 12-row score tiles, 32-key panels),
    with and without a window: the rows past the length are computed from copies and never stored."""
    if not native.attention_ready():
        pytest.skip("the fused attention needs the native library built with AVX-512 on torch's OpenMP threads")
    q, k, v = _qkv(2, 4, 2, T, 24, seed=T)
    with torch.inference_mode():
        out = cpu_attention.causal(q, k, v, window=window)
    torch.testing.assert_close(out.double(), _ref(q, k, v, window=window), rtol=1e-5, atol=2e-5)
