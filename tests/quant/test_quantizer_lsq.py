"""FakeQuantizer with learned scales: LSQ's init and hand-computed gradients (grad scale 1/sqrt(N Qp)),
LSQ+'s learned integer offset, PACT's clipping, and the ``init`` options of a learned int scale."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.quantizers import fq
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant import ste
from qat.quant.qparams import SCALE_EPS, qparams_from_range
from qat.quant.quantizer import FakeQuantizer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- LSQ / LSQ+ / PACT
def test_lsq_init_is_2_mean_abs_over_sqrt_qp() -> None:
    w = torch.randn(4, 6)
    q = fq(shape=w.shape, format="int4", granularity="per_channel", scale="lsq")
    assert q.learned and isinstance(q.scale, nn.Parameter) and q.observer is None and q.zero_point is None
    assert q.initialized == 0 and not q.is_initialized
    q(w)
    assert torch.allclose(q.scale.detach(), 2 * w.abs().mean(dim=1) / math.sqrt(7))
    assert q.initialized == 1 and q.is_initialized
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
    per_elem = _lsq_grad(
        q.view(x), q.scale.detach().reshape(q.granularity.bcast(q.scale, x).shape), q.qmin, qp
    )
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
