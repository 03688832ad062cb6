"""FakeQuantizer with binary and ternary scales: XNOR-Net mean, learned binary alpha, TWN, BitNet absmean
and TTQ's learned positive / negative scales."""

from __future__ import annotations

import pytest
import torch
from helpers.quantizers import fq
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- binary / ternary
def test_binary_per_channel_mean() -> None:
    w = torch.randn(4, 6)
    w[0, 0] = 0.0
    q = fq(shape=w.shape, format="binary", granularity="per_channel")
    assert q.scale is None and q.observer is None
    wr = w.clone().requires_grad_()
    y = q(wr)
    alpha = w.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(y, torch.where(w >= 0, 1.0, -1.0) * alpha)
    assert y[0, 0] > 0  # sign(0) = +1
    y.sum().backward()
    assert torch.allclose(wr.grad, alpha.expand_as(w) * (w.abs() <= 1))


def test_binary_per_tensor_and_codes() -> None:
    w = torch.randn(3, 5)
    q = fq(shape=w.shape, format="binary")
    assert torch.allclose(q(w), torch.where(w >= 0, 1.0, -1.0) * w.abs().mean())
    codes, s, _ = q.quantize(w)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 1}
    assert torch.allclose(codes.float() * s, q(w))


def test_binary_activation_is_plain_sign() -> None:
    q = fq("activation", format="binary")
    x = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], requires_grad=True)
    y = q(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_binary_lsq_learned_scale() -> None:
    w = torch.randn(4, 6)
    q = fq(shape=w.shape, format="binary", scale="lsq", granularity="per_channel")
    y = q(w)
    assert q.learned and torch.allclose(q.scale.detach(), w.abs().mean(dim=1))
    assert torch.allclose(y, torch.sign(w) * w.abs().mean(dim=1, keepdim=True))
    y.sum().backward()
    assert torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


def test_ternary_twn() -> None:
    w = torch.randn(4, 16)
    q = fq(shape=w.shape, format="ternary", granularity="per_channel")
    y = q(w)
    delta = 0.7 * w.abs().mean(dim=1, keepdim=True)
    mask = w.abs() > delta
    alpha = (w.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    assert torch.allclose(y, torch.sign(w) * mask * alpha)
    codes, s, thr = q.quantize(w)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.allclose(thr, delta) and torch.allclose(s, alpha)


def test_ternary_absmean_is_bitnet_b158() -> None:
    w = torch.randn(6, 10)
    for gran, dims in (("per_tensor", None), ("per_channel", 1)):
        q = fq(shape=w.shape, format="ternary", scale="absmean", granularity=gran)
        gamma = w.abs().mean() if dims is None else w.abs().mean(dim=dims, keepdim=True)
        assert torch.allclose(q(w), torch.round(torch.clamp(w / gamma, -1, 1)) * gamma)


def test_ternary_ttq() -> None:
    w = torch.randn(4, 16)
    q = fq(shape=w.shape, format="ternary", scale="ttq")
    y = q(w)
    assert q.learned and isinstance(q.scale_neg, nn.Parameter)
    pos, neg = q.scale.detach(), q.scale_neg.detach()
    assert torch.allclose(pos, w.abs().mean().reshape(1)) and torch.equal(pos, neg)
    with torch.no_grad():
        q.scale_neg.fill_(0.25)
    y = q(w)
    thr = 0.05 * w.abs().max()
    expected = torch.where(w > thr, pos, torch.where(w < -thr, torch.tensor(-0.25), torch.tensor(0.0)))
    assert torch.allclose(y, expected)
    y.sum().backward()
    assert q.scale.grad.abs().sum() > 0 and q.scale_neg.grad.abs().sum() > 0
