"""Numerics of each quantization method against its paper: TWN threshold/alpha, BitNet absmean, TTQ's
three-region gradient, XNOR alpha with the clipped STE, FP8 rounding against torch's float8 casts, PACT's
clipping gradient and LSQ+'s integer offset. Values must also be exactly what export stores."""

from __future__ import annotations

import pytest
import torch

from qat.config import QuantSpec
from qat.quant.quantizer import FakeQuantizer


def fq(role: str = "weight", shape=None, **spec) -> FakeQuantizer:
    return FakeQuantizer(QuantSpec(**spec), role, shape, name="layer")


def _value_and_grad(q: FakeQuantizer, x: torch.Tensor, g: torch.Tensor | None = None):
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(torch.ones_like(y) if g is None else g)
    return y.detach(), x.grad


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- ternary
def test_twn_threshold_and_alpha_per_tensor() -> None:
    w = torch.randn(8, 32)
    q = fq(shape=w.shape, format="ternary", scale="twn")
    y, grad = _value_and_grad(q, w)
    delta = 0.7 * w.abs().mean()  # Li & Liu (2016): delta = 0.7 E|W|
    mask = w.abs() > delta
    alpha = w.abs()[mask].mean()  # alpha = mean of |W| over the kept weights
    assert torch.allclose(y, torch.sign(w) * mask * alpha)
    assert 0.3 < mask.float().mean() < 0.7  # a Gaussian keeps roughly half the weights
    assert torch.equal(grad, torch.ones_like(w))  # straight-through: dL/dW = dL/dW_q


def test_bitnet_absmean_values_codes_and_ste() -> None:
    w = torch.randn(16, 24) * 0.02
    q = fq(shape=w.shape, format="ternary", scale="absmean")
    y, grad = _value_and_grad(q, w)
    gamma = w.abs().mean()
    expected_codes = torch.round(torch.clamp(w / gamma, -1, 1))  # BitNet b1.58: RoundClip(W / gamma, -1, 1)
    assert torch.allclose(y, expected_codes * gamma)
    codes, scale, _ = q.quantize(w)
    assert torch.equal(codes.float(), expected_codes)
    assert torch.equal(codes.float() * scale, y)  # bit for bit what an exporter multiplies back
    assert torch.equal(grad, torch.ones_like(w))  # w + (quant(w) - w).detach() in the reference code


def test_ttq_gradients_follow_the_paper() -> None:
    w = torch.tensor([[0.9, 0.5, 0.01, -0.02, -0.6, -1.0]])
    q = fq(shape=w.shape, format="ternary", scale="ttq")
    q(w)  # initialise Wp = Wn = mean|w|
    with torch.no_grad():
        q.scale.fill_(0.7)
        q.scale_neg.fill_(0.3)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y, grad = _value_and_grad(q, w, g)
    # threshold 0.05 * max|w| = 0.05: 0.01 and -0.02 are zeroed
    assert torch.equal(y, torch.tensor([[0.7, 0.7, 0.0, 0.0, -0.3, -0.3]]))
    # latent weights: gradient scaled by Wp above, 1 in the dead zone, Wn below (Zhu et al. 2017, eq. 8)
    assert torch.allclose(grad, g * torch.tensor([[0.7, 0.7, 1.0, 1.0, 0.3, 0.3]]))
    # scales: the summed gradients of their positions (before LSQ's gradient scaling 1/sqrt(N * Qp))
    n = w.numel()
    assert torch.allclose(q.scale.grad, torch.tensor([1.0 + 2.0]) / n**0.5)
    assert torch.allclose(q.scale_neg.grad, -torch.tensor([5.0 + 6.0]) / n**0.5)
    codes, s, _ = q.quantize(w)
    assert codes.tolist() == [[1, 1, 0, 0, -1, -1]] and torch.allclose(s, torch.tensor(0.7))


# ---------------------------------------------------------------- binary
def test_xnor_alpha_per_output_channel_and_clipped_ste() -> None:
    w = torch.randn(4, 9) * torch.tensor([0.1, 0.5, 1.0, 2.0])[:, None]
    q = fq(shape=w.shape, format="binary", granularity="per_channel")
    y, grad = _value_and_grad(q, w)
    alpha = w.abs().mean(dim=1, keepdim=True)  # Rastegari et al. 2016: alpha = ||W||_1 / n
    assert torch.equal(y, torch.where(w >= 0, 1.0, -1.0) * alpha)
    assert torch.allclose(grad, alpha * (w.abs() <= 1))  # BinaryConnect: no gradient beyond |w| > 1
    assert (w.abs() > 1).any()


def test_binary_activation_sign_with_hardtanh_ste() -> None:
    q = fq("activation", format="binary").train()
    x = torch.linspace(-2, 2, 9)
    y, grad = _value_and_grad(q, x)
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0))
    assert torch.equal(grad, (x.abs() <= 1).float())


# ---------------------------------------------------------------- FP8
FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_fp8_weight_equals_torch_float8_cast(fmt: str, granularity: str) -> None:
    dtype, fmax = FP8[fmt]
    w = torch.randn(6, 64) * torch.logspace(-3, 2, 6)[:, None]
    q = fq(shape=w.shape, format=fmt, granularity=granularity)
    y = q(w)
    s = q.scale.reshape(-1, 1)
    assert torch.equal(y, (w / s).to(dtype).float() * s)  # round to nearest even, like the cast
    codes, scale, _ = q.quantize(w)
    assert torch.equal(codes, codes.to(dtype).float())  # every code is a float8 value
    assert codes.abs().max() <= fmax


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_static_activation_saturates_beyond_the_calibrated_range(fmt: str) -> None:
    _, fmax = FP8[fmt]
    q = fq("activation", format=fmt, scale="minmax").train()
    q(torch.linspace(-4, 4, 101))  # calibrate: scale = 4 / fmax
    q.enable_observer(False)
    y, grad = _value_and_grad(q, torch.tensor([3.0, 10.0, -10.0]))
    assert torch.allclose(y[1:], torch.tensor([4.0, -4.0]))  # saturated at the largest finite value
    assert torch.equal(grad, torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------- PACT / LSQ+
def test_pact_gradients() -> None:
    q = fq("activation", format="uint4", scale="pact").train()
    q(torch.tensor([[0.0, 3.0]]))  # alpha = 3, step = 0.2
    x = torch.tensor([[-1.0, 0.55, 1.33, 2.95, 3.5, 10.0]])
    y, grad = _value_and_grad(q, x)
    assert torch.allclose(y, torch.tensor([[0.0, 0.6, 1.4, 3.0, 3.0, 3.0]]))
    assert torch.equal(grad, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))  # dy/dx = 1 on [0, alpha)
    # dy/dalpha = 1 for x >= alpha, 0 elsewhere (Choi et al. 2018); the parameter is the step = alpha / 15,
    # with LSQ's gradient scale 1/sqrt(N * Qp) (N = 6 features per example here).
    expected = 2 * 15 / (6 * 15) ** 0.5
    assert torch.allclose(q.scale.grad, torch.tensor([expected]))


def test_lsq_plus_offset_is_an_integer_zero_point_and_exports_exactly() -> None:
    q = fq("activation", format="int4", scale="lsq", symmetric=False).train()
    x = torch.rand(8, 16) * 2 - 0.3
    q(x)
    with torch.no_grad():
        q.zero_point.add_(0.4)  # learned offsets drift off the integer grid; the forward rounds them
    s, z = (t.detach() for t in q.qparams(x))
    assert float(z) == round(float(z))
    y = q(x)
    codes, _, _ = q.quantize(x)
    assert torch.equal((codes.float() - z) * s, y.detach())
