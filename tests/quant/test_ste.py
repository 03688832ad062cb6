"""STE functions: rounding, gradient routing, bit-exact agreement with torch's fake quant, FP8 rounding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.quant import ste

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _x(seed: int, shape: tuple[int, ...], spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * spread


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
scales = st.floats(2.0**-10, 10.0, width=32)


# ---------------------------------------------------------------- rounding and gradient helpers
def test_round_ste_is_half_to_even_with_unit_gradient() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 1.51], requires_grad=True)
    y = ste.round_ste(x)
    assert torch.equal(y, torch.tensor([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 2.0]))
    y.backward(torch.arange(8.0))
    assert torch.equal(x.grad, torch.arange(8.0))


def test_grad_scale_is_identity_forward_and_scales_gradient() -> None:
    p = torch.tensor([0.3, -1.7], requires_grad=True)
    y = ste.grad_scale(p, 0.25)
    assert torch.equal(y, p.detach())
    y.sum().backward()
    assert torch.equal(p.grad, torch.full((2,), 0.25))


def test_quantize_affine_codes_match_fake_quant() -> None:
    x = _x(0, (64,), 3.0)
    s, z = torch.tensor(0.05), torch.tensor(3.0)
    q = ste.quantize_affine(x, s, z, -8, 7)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, torch.round(q))
    assert torch.equal((q - z) * s, ste.fake_quant_affine(x, s, z, -8, 7))


# ---------------------------------------------------------------- bit-exact vs torch.fake_quantize_*
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=shapes,
    scale=scales,
    bits=st.integers(2, 8),
    signed=st.booleans(),
    zp_frac=st.floats(0.0, 1.0),
)
def test_fake_quant_affine_per_tensor_equals_torch(seed, shape, scale, bits, signed, zp_frac) -> None:
    qmin, qmax = _grid(bits, signed)
    zp = int(round(qmin + zp_frac * (qmax - qmin)))
    x = _x(seed, shape, scale * (qmax - qmin) * 0.75)  # a good share of values falls outside the range
    s = torch.tensor(scale, dtype=torch.float32)

    x1 = x.clone().requires_grad_()
    y1 = ste.fake_quant_affine(x1, s, torch.tensor(float(zp)), qmin, qmax)
    x2 = x.clone().requires_grad_()
    y2 = torch.fake_quantize_per_tensor_affine(x2, s, torch.tensor(zp, dtype=torch.int32), qmin, qmax)
    assert torch.equal(y1, y2)
    g = _x(seed + 1, shape, 1.0)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    axis_pick=st.integers(0, 3),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    data=st.data(),
)
def test_fake_quant_affine_per_channel_equals_torch(seed, shape, axis_pick, bits, signed, data) -> None:
    qmin, qmax = _grid(bits, signed)
    axis = axis_pick % len(shape)
    c = shape[axis]
    scale = torch.tensor(data.draw(st.lists(scales, min_size=c, max_size=c)), dtype=torch.float32)
    zp = torch.tensor(data.draw(st.lists(st.integers(qmin, qmax), min_size=c, max_size=c)), dtype=torch.int32)
    x = _x(seed, shape, 1.0) * (scale.max() * (qmax - qmin) * 0.75)
    bshape = [-1 if d == axis else 1 for d in range(len(shape))]

    x1 = x.clone().requires_grad_()
    y1 = ste.fake_quant_affine(x1, scale.reshape(bshape), zp.float().reshape(bshape), qmin, qmax)
    x2 = x.clone().requires_grad_()
    y2 = torch.fake_quantize_per_channel_affine(x2, scale, zp, axis, qmin, qmax)
    assert torch.equal(y1, y2)
    g = _x(seed + 1, shape, 1.0)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_fake_quant_affine_clipped_ste() -> None:
    s = torch.tensor(0.5)
    # int4: codes -8..7, so the representable range is [-4.0, 3.5]; ties at the edges round into range.
    x = torch.tensor([-9.0, -4.2, -4.0, -1.0, 0.0, 1.3, 3.5, 3.74, 3.76, 12.0], requires_grad=True)
    y = ste.fake_quant_affine(x, s, torch.tensor(0.0), -8, 7)
    assert torch.equal(y.detach(), torch.tensor([-4.0, -4.0, -4.0, -1.0, 0.0, 1.5, 3.5, 3.5, 3.5, 3.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_fake_quant_affine_round_half_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    y = ste.fake_quant_affine(x, torch.tensor(1.0), torch.tensor(0.0), -128, 127)
    assert torch.equal(y, torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0]))


def test_fake_quant_affine_lsq_scale_and_zero_point_gradients() -> None:
    x = torch.tensor([-5.0, -0.26, 0.1, 0.74, 1.2, 9.0])
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(1.0, requires_grad=True)
    y = ste.fake_quant_affine(x, s, z, -4, 3)  # int3 with zero point 1: codes -4..3 cover [-2.5, 1.0]
    y.sum().backward()
    v = x / 0.5
    inside = (torch.round(v) + 1 >= -4) & (torch.round(v) + 1 <= 3)
    per_elem = torch.where(
        inside, torch.round(v) - v, torch.where(v < 0, torch.tensor(-4.0 - 1), torch.tensor(3.0 - 1))
    )
    assert torch.allclose(s.grad, per_elem.sum(), atol=1e-6)
    # d y / d z: 0 inside (the offset cancels), -s for each clipped value.
    assert torch.allclose(z.grad, torch.tensor(-0.5 * (~inside).sum().item()))


# ---------------------------------------------------------------- binary / ternary STEs
def test_sign_ste() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = ste.sign_ste(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))  # hardtanh window


def test_ternary_ste() -> None:
    x = torch.tensor([-2.0, -0.5, -0.4, 0.0, 0.4, 0.5, 3.0], requires_grad=True)
    y = ste.ternary_ste(x, torch.tensor(0.4))
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(7))


# ---------------------------------------------------------------- FP8
def _fp8_values(fmt: str) -> torch.Tensor:
    dt, _ = FP8[fmt]
    v = torch.arange(256, dtype=torch.uint8).view(dt).float()
    return v[torch.isfinite(v)].unique()


@pytest.mark.parametrize("fmt", list(FP8))
def test_round_to_fp8_fixes_every_representable_value(fmt: str) -> None:
    v = _fp8_values(fmt)
    assert torch.equal(ste.round_to_fp8(v, fmt), v)
    mids = (v[1:] + v[:-1]) / 2  # exact ties: round half to even, like the cast
    assert torch.equal(ste.round_to_fp8(mids, fmt), mids.to(FP8[fmt][0]).float())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), fmt=st.sampled_from(list(FP8)), n=st.integers(1, 300))
def test_round_to_fp8_equals_cast(seed: int, fmt: str, n: int) -> None:
    dt, fmax = FP8[fmt]
    g = torch.Generator().manual_seed(seed)
    lo_exp = -20 if fmt == "fp8_e4m3" else -22
    e = torch.randint(lo_exp, int(math.log2(fmax)) + 1, (n,), generator=g).float()
    x = (torch.randn(n, generator=g) * torch.exp2(e)).clamp(-fmax, fmax)
    assert torch.equal(ste.round_to_fp8(x, fmt), x.to(dt).float())


@pytest.mark.parametrize("fmt", list(FP8))
def test_round_to_fp8_saturates(fmt: str) -> None:
    _, fmax = FP8[fmt]
    x = torch.tensor([fmax * 1.01, -fmax * 3, 1e30, -float("inf"), float("inf")])
    assert torch.equal(ste.round_to_fp8(x, fmt), torch.tensor([fmax, -fmax, fmax, -fmax, fmax]))


def test_fp8_params_unknown_format() -> None:
    with pytest.raises(
        ValueError, match=r"format: 'fp8_e3m4' is not an FP8 format; allowed: fp8_e4m3, fp8_e5m2"
    ):
        ste.round_to_fp8(torch.zeros(1), "fp8_e3m4")


@pytest.mark.parametrize("fmt", list(FP8))
def test_fake_quant_fp8_values_and_saturating_ste(fmt: str) -> None:
    dt, fmax = FP8[fmt]
    s = torch.tensor(0.37)
    x = torch.tensor(
        [0.0, 0.01, -1.3, 5.0, fmax * 0.37 * 0.99, fmax * 0.37 * 1.5, -fmax * 0.37 * 4], requires_grad=True
    )
    y = ste.fake_quant_fp8(x, s, fmt)
    xs = x.detach() * torch.reciprocal(s)
    assert torch.equal(y.detach(), xs.clamp(-fmax, fmax).to(dt).float() * s)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_fake_quant_fp8_scale_gradient() -> None:
    fmt = "fp8_e4m3"
    x = torch.tensor([0.3, -2.1, 1000.0])
    s = torch.tensor(0.5, requires_grad=True)
    ste.fake_quant_fp8(x, s, fmt).sum().backward()
    v = x / 0.5
    expected = (ste.round_to_fp8(v[:2], fmt) - v[:2]).sum() + 448.0  # the clip level for the saturated value
    assert torch.allclose(s.grad, expected)
