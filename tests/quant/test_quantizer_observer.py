"""FakeQuantizer with observer and dynamic scales: every granularity against torch's fake-quant ops (values
and gradients), the observers' range semantics, and scales computed from each tensor."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.quantizers import fq, grad, int_formats, randn, torch_per_channel
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.quant.qparams import qparams_from_range


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- int, static (observers)
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    fmt=int_formats,
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
)
def test_int_per_tensor_equals_torch(seed: int, fmt: str, symmetric: bool, shape: tuple[int, ...]) -> None:
    x = randn(seed, *shape) * 3
    q = fq(shape=shape, format=fmt, symmetric=symmetric)
    y, gx = grad(q, x, randn(seed + 1, *shape))
    lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    s, z = qparams_from_range(lo, hi, q.qmin, q.qmax, symmetric)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)

    def ref(t):
        return torch.fake_quantize_per_tensor_affine(t, q.scale, q.zero_point.to(torch.int32), q.qmin, q.qmax)

    y_ref, gx_ref = grad(ref, x, randn(seed + 1, *shape))
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    fmt=int_formats,
    symmetric=st.booleans(),
    shape=st.sampled_from([(4, 3), (3, 5), (4, 3, 2, 2), (2, 3, 3), (3, 2, 1, 2)]),
    data=st.data(),
)
def test_int_per_channel_any_axis_equals_torch(seed, fmt, symmetric, shape, data) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = randn(seed, *shape)
    q = fq(shape=shape, format=fmt, symmetric=symmetric, granularity="per_channel", axis=axis)
    assert q.stat_shape == (shape[axis],)
    g = randn(seed + 1, *shape)
    y, gx = grad(q, x, g)
    y_ref, gx_ref = grad(lambda t: torch_per_channel(t, q, axis % len(shape)), x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    # Each slice along ``axis`` has its own range.
    slices = x.movedim(axis, 0).reshape(shape[axis], -1)
    s, z = qparams_from_range(slices.amin(1), slices.amax(1), q.qmin, q.qmax, symmetric)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)


@pytest.mark.parametrize("axis", [1, -3, -1])
def test_conv_weight_per_channel_axis(axis: int) -> None:
    w = torch.randn(4, 3, 2, 2)
    w[:, 1] *= 10  # input channel 1 has a much larger range
    q = fq(shape=w.shape, format="int8", granularity="per_channel", axis=axis)
    q(w)
    expected = w.abs().movedim(axis, 0).reshape(w.shape[axis], -1).amax(1) / 127
    assert torch.allclose(q.scale, expected)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    fmt=int_formats,
    symmetric=st.booleans(),
    shape_gs=st.sampled_from([((4, 8), 2), ((4, 8), 8), ((3, 12), 4), ((2, 3, 2, 2), 6), ((2, 3, 2, 2), 4)]),
)
def test_int_per_group_equals_per_row_fake_quant(seed, fmt, symmetric, shape_gs) -> None:
    shape, gs = shape_gs
    x = randn(seed, *shape)
    q = fq(shape=shape, format=fmt, symmetric=symmetric, granularity="per_group", group_size=gs)
    k = math.prod(shape[1:])
    assert q.stat_shape == (shape[0], k // gs, 1)
    g = randn(seed + 1, *shape)
    y, gx = grad(q, x, g)
    rows = x.reshape(-1, gs)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), q.qmin, q.qmax, symmetric)
    assert torch.equal(q.scale.flatten(), s) and torch.equal(q.zero_point.flatten(), z)
    y_ref, gx_ref = grad(lambda t: torch_per_channel(t.reshape(-1, gs), q, 0).reshape(shape), x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_int_levels_and_clipped_ste(bits: int, signed: bool) -> None:
    fmt = f"{'int' if signed else 'uint'}{bits}"
    x = torch.linspace(-3, 3, 2001)
    q = fq("activation", format=fmt, symmetric=False).train()
    q(x)  # observe the range [-3, 3]
    xx = (torch.linspace(-6, 6, 4001)).requires_grad_()
    y = q(xx)
    assert y.detach().unique().numel() <= 2**bits
    assert y.detach().unique().numel() >= 2**bits - 1
    y.sum().backward()
    s, z = q.scale, q.zero_point
    code = torch.round(xx.detach() / s) + z
    assert torch.equal(xx.grad, ((code >= q.qmin) & (code <= q.qmax)).float())


def test_symmetric_unsigned_clips_negatives_to_zero() -> None:
    q = fq(format="uint4")
    y = q(torch.tensor([-2.0, -0.1, 0.0, 1.0, 3.0]))
    assert torch.equal(y[:3], torch.zeros(3)) and y[-1] == 3.0


def test_weight_observer_follows_the_current_weight_in_any_mode() -> None:
    q = fq(format="int8").eval()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-0.5, 0.25]))
    assert torch.allclose(q.scale, torch.tensor([0.5 / 127]))


def test_activation_observer_accumulates_in_training_only() -> None:
    q = fq("activation", format="int8").train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-0.5, 2.0]))
    assert q.observer.min_val.item() == -1.0 and q.observer.max_val.item() == 2.0
    q.eval()
    q(torch.tensor([-50.0, 50.0]))
    assert q.observer.max_val.item() == 2.0 and torch.allclose(q.scale, torch.tensor([2.0 / 127]))


def test_static_per_channel_activation_on_conv_input() -> None:
    q = fq("activation", shape=(3,), act_axis=1, format="int8", granularity="per_channel").train()
    x = torch.randn(2, 3, 4, 4) * torch.tensor([1.0, 10.0, 0.1]).reshape(1, 3, 1, 1)
    y = q(x)
    assert q.stat_shape == (3,)
    assert torch.allclose(q.scale, x.abs().amax(dim=(0, 2, 3)) / 127)
    assert torch.equal(y, torch_per_channel(x, q, 1))


@pytest.mark.parametrize("kind", ["ema", "percentile", "mse"])
def test_other_observers_give_sane_scales(kind: str) -> None:
    q = fq("activation", format="int8", scale=kind, percentile=99.0).train()
    for _ in range(3):
        x = torch.randn(64, 16)
        y = q(x)
    assert torch.all(q.scale > 0) and torch.all(q.scale < x.abs().max() / 127 * 1.01)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point.int(), -128, 127))


# ---------------------------------------------------------------- int, dynamic
def test_dynamic_per_token() -> None:
    q = fq("activation", format="int8", granularity="per_token", dynamic=True, symmetric=False)
    assert q.scale is None and q.observer is None
    assert set(dict(q.named_buffers())) == {"fake_quant_enabled", "observer_enabled", "initialized"}
    x = torch.randn(2, 3, 8)
    g = torch.randn(2, 3, 8)
    y, gx = grad(q, x, g)
    rows = x.reshape(-1, 8)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), -128, 127, False)

    def ref(t):
        return torch.fake_quantize_per_channel_affine(t.reshape(-1, 8), s, z.int(), 0, -128, 127).reshape(
            t.shape
        )

    y_ref, gx_ref = grad(ref, x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    # Tokens are independent: blowing one up changes no other token.
    x2 = x.clone()
    x2[0, 0] *= 1000
    y2 = q(x2)
    assert torch.equal(y2[0, 1:], y[0, 1:]) and torch.equal(y2[1], y[1])


def test_dynamic_per_tensor_and_per_channel() -> None:
    x = torch.randn(2, 3, 4)
    q = fq("activation", format="int4", dynamic=True)
    s = x.abs().amax() / 7
    assert torch.equal(
        q(x), torch.fake_quantize_per_tensor_affine(x, s.reshape(1), torch.zeros(1, dtype=torch.int32), -8, 7)
    )
    qc = fq("activation", act_axis=1, format="int4", dynamic=True, granularity="per_channel")
    sc = x.abs().amax(dim=(0, 2)) / 7
    assert torch.equal(
        qc(x), torch.fake_quantize_per_channel_affine(x, sc, torch.zeros(3, dtype=torch.int32), 1, -8, 7)
    )


def test_dynamic_per_group_activation() -> None:
    q = fq("activation", format="int8", granularity="per_group", group_size=4, dynamic=True)
    x = torch.randn(2, 3, 8)
    y = q(x)
    tok = fq("activation", format="int8", granularity="per_token", dynamic=True)
    assert torch.equal(y, tok(x.reshape(2, 3, 2, 4)).reshape(2, 3, 8))


def test_dynamic_ignores_non_finite_when_computing_scales() -> None:
    q = fq("activation", format="int8", granularity="per_token", dynamic=True)
    x = torch.tensor([[1.0, float("inf"), -2.0], [0.5, 0.25, float("nan")]])
    s, _ = q.qparams(x)
    assert torch.allclose(s.flatten(), torch.tensor([2.0, 0.5]) / 127)
