"""lmloss/ops/onednn.py: float32 linear layers through oneDNN, checked against float64 products written here,
on odd shapes and the cases where it must step aside for F.linear (or where torch's op would be wrong)."""

import platform

import pytest
import torch

from lmloss.ops import onednn

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN linear not available: {onednn.status()[1]}")


def _ref(x, w, b=None):
    """x @ w.T + b in float64, as an explicit sum over the input features."""
    y = (x.double()[..., None, :] * w.double()).sum(-1)
    return y if b is None else y + b.double()


def test_available_on_x86_torch_with_onednn():
    """On an x86-64 torch built with oneDNN it must be on: tests below would otherwise skip silently."""
    if not (X86 and torch.backends.mkldnn.is_available()):
        pytest.skip("not an x86-64 torch with oneDNN")
    ok, why = onednn.status()
    assert ok, why


@needs_onednn
@pytest.mark.parametrize("x_shape, out, bias", [((7, 13), 5, False), ((2, 37, 61), 129, True), ((61,), 3, True),
                                                 ((3, 4, 5, 19), 1, False), ((0, 11), 7, True)])
def test_matches_float64_reference(x_shape, out, bias):
    g = torch.Generator().manual_seed(sum(x_shape) + out)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(out, x_shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    before = x.clone(), w.clone()
    assert onednn.applies(x, w, b)
    y = onednn.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (*x_shape[:-1], out)
    torch.testing.assert_close(y.double(), _ref(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before[0]) and torch.equal(w, before[1])  # inputs never written to


@needs_onednn
def test_strided_input_and_strided_bias():
    """A strided bias gives wrong numbers from torch 2.13's op itself (1.96 off in a 4 x 6 product): linear
    must hand it a contiguous one. A strided input is read as it is."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 9, generator=g)[:, ::2]          # (12, 5), column stride 2
    w = torch.randn(6, 5, generator=g)
    b = torch.randn(12, generator=g)[::2]                # (6,), stride 2
    torch.testing.assert_close(onednn.linear(x, w, b).double(), _ref(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn.linear(x.T.contiguous().T, w).double(), _ref(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_nan_propagates():
    x = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    y = onednn.linear(x, torch.ones(3, 2))
    assert y[0].isnan().all() and torch.equal(y[1], torch.full((3,), 3.0))


@pytest.mark.parametrize("case", ["bfloat16", "float64", "grad", "strided weight", "no input features"])
def test_steps_aside_for_f_linear(case):
    """Where oneDNN's float32 product does not apply, linear is F.linear: same values, autograd intact."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    if case in ("bfloat16", "float64"):
        x, w = x.to(getattr(torch, case)), w.to(getattr(torch, case))
    elif case == "grad":
        w.requires_grad_(True)
    elif case == "strided weight":
        w = torch.randn(6, 3, generator=g).T  # oneDNN would take a reference path 1000x slower
    else:
        x, w = torch.randn(4, 0), torch.randn(3, 0)
    assert not onednn.applies(x, w)
    y = onednn.linear(x, w)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    if case == "grad":
        y.sum().backward()
        torch.testing.assert_close(w.grad, x.sum(0).expand(3, 6))


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("LMLOSS_ONEDNN", "0")
    onednn.status.cache_clear()
    try:
        ok, why = onednn.status()
        assert not ok and "LMLOSS_ONEDNN=0" in why
        x, w = torch.randn(2, 3), torch.randn(4, 3)
        assert not onednn.applies(x, w)
        assert torch.equal(onednn.linear(x, w), torch.nn.functional.linear(x, w))
    finally:
        monkeypatch.delenv("LMLOSS_ONEDNN")
        onednn.status.cache_clear()


def test_respects_torch_backends_mkldnn_enabled():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    torch.backends.mkldnn.enabled = False
    try:
        assert not onednn.applies(x, w)
        assert torch.equal(onednn.linear(x, w), torch.nn.functional.linear(x, w))
    finally:
        torch.backends.mkldnn.enabled = True
    assert onednn.applies(x, w) == onednn.available()
