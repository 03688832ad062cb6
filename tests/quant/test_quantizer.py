"""FakeQuantizer: every granularity and scale source, numerics against torch's fake-quant ops and hand
computations, LSQ/LSQ+/PACT gradients, state in buffers, and no host syncs (no dynamo graph breaks)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant import ste
from qat.quant.qparams import SCALE_EPS, qparams_from_range
from qat.quant.quantizer import FakeQuantizer

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def fq(role: str = "weight", shape=None, act_axis: int = -1, **spec) -> FakeQuantizer:
    return FakeQuantizer(QuantSpec(**spec), role, shape, name="layer", act_axis=act_axis)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _torch_per_channel(x: torch.Tensor, q: FakeQuantizer, axis: int) -> torch.Tensor:
    return torch.fake_quantize_per_channel_affine(
        x, q.scale.flatten(), q.zero_point.flatten().to(torch.int32), axis, q.qmin, q.qmax
    )


def _grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


int_formats = st.builds(lambda b, s: f"{'int' if s else 'uint'}{b}", st.integers(2, 8), st.booleans())


# ---------------------------------------------------------------- construction errors
def test_bad_role() -> None:
    with pytest.raises(ValueError, match=r"role: 'bias' is not valid; allowed: weight, activation"):
        FakeQuantizer(QuantSpec(), "bias")


def test_per_channel_needs_shape() -> None:
    with pytest.raises(ValueError, match="needs the tensor shape"):
        fq(granularity="per_channel")


def test_axis_out_of_range_message() -> None:
    with pytest.raises(QuantConfigError) as ei:
        fq(shape=(4, 3, 2, 2), granularity="per_channel", axis=4)
    msg = str(ei.value)
    assert msg.startswith("quant.weight.axis: 4 is out of range for layer 'layer'")
    assert "(4, 3, 2, 2)" in msg and "allowed: -4..3" in msg


def test_group_size_must_divide_the_input_dimension() -> None:
    with pytest.raises(QuantConfigError) as ei:
        fq(shape=(4, 3, 3, 3), granularity="per_group", group_size=5)
    msg = str(ei.value)
    assert msg.startswith(
        "quant.weight.group_size: 5 does not divide the input dimension 27 of layer 'layer'"
    )
    assert "allowed: a divisor of 27" in msg and "[1, 3, 9, 27]" in msg


def test_dynamic_group_size_must_divide_the_last_dimension() -> None:
    q = fq("activation", format="int8", granularity="per_group", group_size=4, dynamic=True)
    with pytest.raises(
        QuantConfigError, match=r"quant\.activation\.group_size: 4 does not divide the last dimension 6"
    ):
        q(torch.randn(2, 6))


# ---------------------------------------------------------------- int, static (observers)
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    fmt=int_formats,
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
)
def test_int_per_tensor_equals_torch(seed: int, fmt: str, symmetric: bool, shape: tuple[int, ...]) -> None:
    x = _randn(seed, *shape) * 3
    q = fq(shape=shape, format=fmt, symmetric=symmetric)
    y, gx = _grad(q, x, _randn(seed + 1, *shape))
    lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    s, z = qparams_from_range(lo, hi, q.qmin, q.qmax, symmetric)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)

    def ref(t):
        return torch.fake_quantize_per_tensor_affine(t, q.scale, q.zero_point.to(torch.int32), q.qmin, q.qmax)

    y_ref, gx_ref = _grad(ref, x, _randn(seed + 1, *shape))
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
    x = _randn(seed, *shape)
    q = fq(shape=shape, format=fmt, symmetric=symmetric, granularity="per_channel", axis=axis)
    assert q.stat_shape == (shape[axis],)
    g = _randn(seed + 1, *shape)
    y, gx = _grad(q, x, g)
    y_ref, gx_ref = _grad(lambda t: _torch_per_channel(t, q, axis % len(shape)), x, g)
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
    x = _randn(seed, *shape)
    q = fq(shape=shape, format=fmt, symmetric=symmetric, granularity="per_group", group_size=gs)
    k = math.prod(shape[1:])
    assert q.stat_shape == (shape[0], k // gs, 1)
    g = _randn(seed + 1, *shape)
    y, gx = _grad(q, x, g)
    rows = x.reshape(-1, gs)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), q.qmin, q.qmax, symmetric)
    assert torch.equal(q.scale.flatten(), s) and torch.equal(q.zero_point.flatten(), z)
    y_ref, gx_ref = _grad(lambda t: _torch_per_channel(t.reshape(-1, gs), q, 0).reshape(shape), x, g)
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
    assert torch.equal(y, _torch_per_channel(x, q, 1))


@pytest.mark.parametrize("kind", ["ema", "percentile", "mse"])
def test_other_observers_give_sane_scales(kind: str) -> None:
    q = fq("activation", format="int8", scale=kind, percentile=99.0).train()
    for _ in range(3):
        x = torch.randn(64, 16)
        y = q(x)
    assert torch.all(q.scale > 0) and torch.all(q.scale < x.abs().max() / 127 * 1.01)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point.int(), -128, 127))


def test_fake_quant_and_observer_flags() -> None:
    q = fq("activation", format="int4").train()
    q.enable_fake_quant(False)
    x = torch.randn(8) * 5
    assert q(x) is x  # float pass-through, but the observer still records (float warm-up)
    assert q.observer.initialized == 1 and q.fake_quant_enabled == 0 and not q._fq_on
    q.enable_fake_quant(True).enable_observer(False)
    scale = q.scale.clone()
    q(x * 100)
    assert torch.equal(q.scale, scale) and q.observer_enabled == 0 and not q._obs_on


# ---------------------------------------------------------------- int, dynamic
def test_dynamic_per_token() -> None:
    q = fq("activation", format="int8", granularity="per_token", dynamic=True, symmetric=False)
    assert q.scale is None and q.observer is None
    assert set(dict(q.named_buffers())) == {"fake_quant_enabled", "observer_enabled", "initialized"}
    x = torch.randn(2, 3, 8)
    g = torch.randn(2, 3, 8)
    y, gx = _grad(q, x, g)
    rows = x.reshape(-1, 8)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), -128, 127, False)

    def ref(t):
        return torch.fake_quantize_per_channel_affine(t.reshape(-1, 8), s, z.int(), 0, -128, 127).reshape(
            t.shape
        )

    y_ref, gx_ref = _grad(ref, x, g)
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


# ---------------------------------------------------------------- LSQ / LSQ+ / PACT
def test_lsq_init_is_2_mean_abs_over_sqrt_qp() -> None:
    w = torch.randn(4, 6)
    q = fq(shape=w.shape, format="int4", granularity="per_channel", scale="lsq")
    assert q.learned and isinstance(q.scale, nn.Parameter) and q.observer is None and q.zero_point is None
    assert q.initialized == 0 and not q._initialized
    q(w)
    assert torch.allclose(q.scale.detach(), 2 * w.abs().mean(dim=1) / math.sqrt(7))
    assert q.initialized == 1 and q._initialized
    before = q.scale.detach().clone()
    q(w * 10)  # initialised once only
    assert torch.equal(q.scale.detach(), before)


def _lsq_grad(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """d(sum y)/ds per element, by hand: round(x/s) - x/s inside, qmin / qmax outside (float64)."""
    v = x.double() / s.double()
    r = torch.round(v)
    return torch.where(r < qmin, float(qmin), torch.where(r > qmax, float(qmax), r - v))


@pytest.mark.parametrize(
    ("role", "shape", "spec", "n"),
    [
        ("weight", (4, 6), dict(format="int4", scale="lsq"), 24),
        ("weight", (4, 6), dict(format="int3", scale="lsq", granularity="per_channel"), 6),
        ("weight", (4, 8), dict(format="int4", scale="lsq", granularity="per_group", group_size=4), 4),
        ("activation", (5, 6), dict(format="int4", scale="lsq"), 6),  # features per example
        ("activation", (5, 6), dict(format="uint4", scale="lsq"), 6),
    ],
)
def test_lsq_scale_gradient_matches_hand_computation(role, shape, spec, n) -> None:
    x = torch.randn(*shape) * 2
    q = fq(role, shape=shape if role == "weight" else None, **spec).train()
    q(x)  # initialise
    with torch.no_grad():
        q.scale.copy_(torch.rand(q.stat_shape) * 0.3 + 0.2)
    q.scale.grad = None
    q(x).sum().backward()
    qp = q.qmax
    per_elem = _lsq_grad(q._view(x), q.scale.detach().reshape(q._bcast(q.scale, x).shape), q.qmin, qp)
    if q.spec.granularity == "per_tensor":
        expected = per_elem.sum().reshape(1)
    elif q.spec.granularity == "per_channel":
        expected = per_elem.sum(dim=1)
    else:
        expected = per_elem.sum(dim=2, keepdim=True)
    expected = expected / math.sqrt(n * qp)
    assert torch.allclose(q.scale.grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert (per_elem != per_elem.round()).any()  # the inside term is exercised ...
    assert ((per_elem == q.qmin) | (per_elem == qp)).any()  # ... and so is the clip term


@pytest.mark.parametrize("value", [0.0, -0.4, -1e-30])
def test_lsq_scale_stays_positive(value: float) -> None:
    x = torch.randn(16) * 2
    q = fq(format="int4", scale="lsq", shape=(16,))
    q(x)
    ref = q(x).detach()
    with torch.no_grad():
        q.scale.fill_(value)
    y = q(x)
    s, _ = q.qparams(x)
    assert torch.all(s > 0) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(q.scale.grad).all()
    if value == -0.4:
        with torch.no_grad():
            q.scale.fill_(0.4)
        assert torch.equal(q(x).detach(), y.detach())  # the sign of the parameter does not matter
    assert not torch.equal(ref, y.detach()) or value == 0.0


def test_lsq_survives_an_optimizer_driving_the_scale_negative() -> None:
    q = fq(format="int4", scale="lsq", shape=(32,))
    opt = torch.optim.SGD(q.parameters(), lr=10.0)
    x = torch.randn(32)
    for _ in range(20):
        opt.zero_grad()
        loss = -q(x).abs().sum()  # a loss that pushes the scale around violently
        loss.backward()
        opt.step()
        assert torch.isfinite(q.scale).all() and torch.isfinite(q(x)).all()
    assert torch.all(q.qparams(x)[0] >= SCALE_EPS)


def test_lsq_plus_learned_zero_point() -> None:
    q = fq("activation", format="int4", scale="lsq", symmetric=False).train()
    x = torch.rand(8, 16) * 3 + 1  # all positive: the offset matters
    q(x)
    assert isinstance(q.zero_point, nn.Parameter)
    s, z = qparams_from_range(x.amin().reshape(1), x.amax().reshape(1), -8, 7, False)
    assert torch.allclose(q.scale.detach(), s) and torch.equal(q.zero_point.detach(), z)
    with torch.no_grad():
        q.zero_point.fill_(-3.4)  # used rounded, as an integer
    y = q(x)
    s_used, z_used = q.qparams(x)
    assert z_used.item() == -3.0
    assert torch.equal(y, ste.fake_quant_affine(x, s_used.detach(), torch.tensor(-3.0), -8, 7))
    y.sum().backward()
    assert torch.isfinite(q.scale.grad).all() and torch.isfinite(q.zero_point.grad).all()
    assert q.zero_point.grad.item() != 0.0  # some values are clipped: the offset gets a gradient
    # Everything inside the range: the offset's gradient is 0, the scale's is the LSQ inside term.
    q.zero_point.grad = None
    with torch.no_grad():
        q.zero_point.fill_(-8.0)
        q.scale.fill_(1.0)
    q(torch.rand(4, 16) * 10).sum().backward()
    assert q.zero_point.grad.item() == 0.0


def test_lsq_plus_offset_gradient_has_the_lsq_scale() -> None:
    """LSQ+ (Bhalgat et al. 2020) scales the offset's gradient like the step's, by 1/sqrt(N * Qp): here N = 16
    features per example, Qp = 7 (int4). Each clipped value adds -s to the raw offset gradient, each value
    inside the range 0."""
    q = fq("activation", format="int4", scale="lsq", symmetric=False).train()
    q(torch.zeros(1, 16))  # initialise (the range is then fixed below)
    with torch.no_grad():
        q.scale.fill_(0.5)
        q.zero_point.fill_(0.0)  # grid [-8, 7] * 0.5 = [-4, 3.5]
    x = torch.zeros(4, 16)
    x[0, :5] = 10.0  # 5 values clipped above
    x[1, :3] = -10.0  # 3 clipped below
    q(x).sum().backward()
    assert q.zero_point.grad.item() == pytest.approx(-0.5 * 8 / math.sqrt(16 * 7), rel=1e-6)


def test_lsq_plus_zero_point_is_clamped_to_the_grid() -> None:
    q = fq("activation", format="uint4", scale="lsq", symmetric=False).train()
    q(torch.rand(4, 4))
    with torch.no_grad():
        q.zero_point.fill_(40.0)
    _, z = q.qparams(torch.rand(4, 4))
    assert z.item() == 15.0


def test_pact_init_and_clip() -> None:
    q = fq("activation", format="uint4", scale="pact").train()
    x = torch.rand(16, 16) * 4
    y = q(x)
    assert torch.allclose(q.scale.detach(), x.amax().reshape(1) / 15)  # clip level alpha = max(x)
    assert y.unique().numel() >= 12  # the whole 4-bit grid is used
    y2 = q(torch.tensor([[-1.0, 100.0]]))
    assert y2[0, 0] == 0.0 and torch.allclose(y2[0, 1], q.scale.detach() * 15)


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


# ---------------------------------------------------------------- fp8
@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_static_per_channel(fmt: str) -> None:
    dt, fmax = FP8[fmt]
    w = torch.randn(4, 8) * torch.tensor([1e-3, 1.0, 10.0, 1e3])[:, None]
    q = fq(shape=w.shape, format=fmt, granularity="per_channel")
    y = q(w)
    s = q.scale[:, None]
    assert torch.allclose(q.scale, torch.clamp(w.abs().amax(1) / fmax, min=SCALE_EPS))
    assert torch.equal(y, (w * torch.reciprocal(s)).to(dt).float() * s)


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_dynamic_per_token(fmt: str) -> None:
    dt, fmax = FP8[fmt]
    x = torch.randn(3, 5, 8)
    q = fq("activation", format=fmt, granularity="per_token", dynamic=True)
    s = x.abs().amax(-1, keepdim=True) / fmax
    assert torch.equal(q(x), (x * torch.reciprocal(s)).to(dt).float() * s)


def test_fp8_lsq_init_and_codes() -> None:
    w = torch.randn(4, 8)
    q = fq(shape=w.shape, format="fp8_e4m3", scale="lsq")
    y = q(w)
    assert q.learned and torch.allclose(q.scale.detach(), w.abs().amax().reshape(1) / 448)
    codes, s, _ = q.quantize(w)
    assert torch.allclose(codes * s, y.detach())
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())


# ---------------------------------------------------------------- quantize(): what export stores
@pytest.mark.parametrize(
    "spec",
    [
        dict(format="int4", granularity="per_channel"),
        dict(format="uint8", symmetric=False),
        dict(format="int4", granularity="per_group", group_size=4, scale="lsq"),
        dict(format="int2", scale="lsq", symmetric=False),
    ],
)
def test_quantize_codes_dequantize_to_forward(spec: dict) -> None:
    w = torch.randn(4, 8)
    q = fq(shape=w.shape, **spec)
    y = q(w).detach()
    codes, s, z = q.quantize(w)
    assert codes.dtype == torch.int8
    if not q.spec.signed:  # the int8 container wraps uint8 codes (128..255): the exporter reinterprets them
        codes = codes.view(torch.uint8)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(((codes.float() - z) * s).reshape(w.shape), y)


# ---------------------------------------------------------------- state: buffers, state_dict, pickling
QUANT_CASES = {
    "int_static_weight": ("weight", (4, 8), dict(format="int4", granularity="per_channel")),
    "int_static_act_ema": ("activation", None, dict(format="uint8", symmetric=False, scale="ema")),
    "int_static_act_percentile": ("activation", None, dict(format="int8", scale="percentile")),
    "int_static_weight_mse": ("weight", (4, 8), dict(format="int4", scale="mse")),
    "int_dynamic_per_token": (
        "activation",
        None,
        dict(format="int8", granularity="per_token", dynamic=True, symmetric=False),
    ),
    "lsq_weight_per_group": (
        "weight",
        (4, 8),
        dict(format="int4", granularity="per_group", group_size=4, scale="lsq"),
    ),
    "lsq_plus_act": ("activation", None, dict(format="int4", scale="lsq", symmetric=False)),
    "pact_act": ("activation", None, dict(format="uint4", scale="pact")),
    "binary": ("weight", (4, 8), dict(format="binary", granularity="per_channel")),
    "binary_act": ("activation", None, dict(format="binary")),
    "ternary": ("weight", (4, 8), dict(format="ternary", granularity="per_channel")),
    "ternary_absmean": ("weight", (4, 8), dict(format="ternary", scale="absmean")),
    "ternary_ttq": ("weight", (4, 8), dict(format="ternary", scale="ttq")),
    "fp8_static": ("weight", (4, 8), dict(format="fp8_e4m3", granularity="per_channel")),
    "fp8_dynamic": ("activation", None, dict(format="fp8_e5m2", granularity="per_token", dynamic=True)),
    "fp8_lsq": ("weight", (4, 8), dict(format="fp8_e4m3", scale="lsq")),
}


def _case(name: str) -> tuple[FakeQuantizer, torch.Tensor]:
    role, shape, spec = QUANT_CASES[name]
    q = fq(role, shape=shape, **spec).train()
    return q, torch.randn(4, 8)


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_no_graph_breaks(name: str) -> None:
    """No ``.item()`` / host sync / data-dependent Python control flow in forward (first call included)."""
    q, x = _case(name)
    explains = []
    try:
        # The first call includes the one-time learned-scale initialisation; learned quantizers are traced
        # a second time to cover the steady state too.
        for _ in range(2 if q.learned else 1):
            torch._dynamo.reset()
            explains.append(torch._dynamo.explain(q)(x))
    finally:
        torch._dynamo.reset()
    for e in explains:
        assert e.graph_break_count == 0, e.break_reasons
        assert e.graph_count == 1


def test_state_lives_in_buffers() -> None:
    q = fq("activation", format="int8", scale="ema")
    assert set(dict(q.named_buffers())) == {
        "fake_quant_enabled",
        "observer_enabled",
        "initialized",
        "scale",
        "zero_point",
        "observer.min_val",
        "observer.max_val",
        "observer.initialized",
    }
    assert list(q.parameters()) == []
    lsq = fq(shape=(4, 8), format="int4", scale="lsq", symmetric=False)
    assert {n for n, _ in lsq.named_parameters()} == {"scale", "zero_point"}


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_state_dict_round_trip_restores_state_and_flags(name: str) -> None:
    a, x = _case(name)
    for _ in range(3):
        a(torch.randn_like(x) * 2)
    a.enable_observer(False).enable_fake_quant(False)
    sd = copy.deepcopy(a.state_dict())

    b, _ = _case(name)
    assert b._fq_on and b._obs_on and not b._initialized
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert (b._fq_on, b._obs_on, b._initialized) == (False, False, a._initialized)
    b.enable_fake_quant(True)
    a.enable_fake_quant(True)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))  # no re-initialisation after a load
    # And back: loading "enabled" flags turns the Python mirrors on again.
    c, _ = _case(name)
    b.load_state_dict(c.state_dict())
    assert b._fq_on and b._obs_on and not b._initialized


def test_state_dict_round_trip_through_a_parent_module() -> None:
    parent = nn.ModuleDict({"q": fq("activation", format="int8")}).train()
    parent["q"](torch.randn(16) * 4)
    parent["q"].enable_observer(False)
    other = nn.ModuleDict({"q": fq("activation", format="int8")})
    other.load_state_dict(parent.state_dict())
    assert not other["q"]._obs_on and torch.equal(other["q"].scale, parent["q"].scale)
    assert torch.equal(other["q"].observer.max_val, parent["q"].observer.max_val)


@pytest.mark.parametrize("name", ["int_static_act_ema", "lsq_weight_per_group", "ternary_ttq"])
def test_pickle_and_deepcopy(name: str) -> None:
    q, x = _case(name)
    q(x)
    for clone in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert torch.equal(clone.eval()(x), q.eval()(x))
        clone.load_state_dict(q.state_dict())  # the load hook survives the copy
        assert clone._initialized == q._initialized


def test_extra_repr() -> None:
    q = fq(shape=(4, 8), format="int4", granularity="per_group", group_size=4, scale="lsq")
    assert "weight: int4 per_group(4) lsq, stat_shape=(4, 2, 1)" in repr(q)


def test_learned_scale_init_options() -> None:
    """``init`` picks where a learned int scale starts: LSQ's rule, the range, or the least-error range."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    err = {}
    for init in ("lsq", "minmax", "mse"):
        spec = QuantSpec(format="int2", granularity="per_channel", scale="lsq", init=init)
        fq = FakeQuantizer(spec, "weight", tuple(w.shape))
        with torch.no_grad():
            err[init] = float((fq(w) - w).pow(2).mean())
        if init == "minmax":
            assert torch.allclose(fq.scale.detach(), w.abs().amax(dim=1) / fq.qmax)
    assert err["mse"] < err["lsq"] and err["mse"] < err["minmax"]
    with pytest.raises(QuantConfigError, match=r"spec.init: 'best' is not valid; allowed: lsq, minmax, mse"):
        QuantSpec(format="int4", scale="lsq", init="best")
    assert QuantSpec(format="int4", scale="mse", init="mse").scale == "mse"  # observers ignore it
