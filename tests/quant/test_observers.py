"""Range observers and the scale / zero-point arithmetic they feed (observers.py, qparams.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.quant.observers import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    finite,
    make_observer,
)
from qat.quant.qparams import SCALE_EPS, lsq_init_scale, qparams_from_range


def _mse(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, sym: bool
) -> torch.Tensor:
    s, z = qparams_from_range(lo, hi, qmin, qmax, sym)
    q = torch.clamp(torch.round(rows / s[:, None]) + z[:, None], qmin, qmax)
    return ((q - z[:, None]) * s[:, None] - rows).pow(2).mean(dim=1)


# ---------------------------------------------------------------- qparams_from_range
def test_qparams_symmetric_signed() -> None:
    s, z = qparams_from_range(torch.tensor([-3.0, -0.5]), torch.tensor([1.0, 2.54]), -128, 127, True)
    assert torch.allclose(s, torch.tensor([3.0, 2.54]) / 127)
    assert torch.equal(z, torch.zeros(2))


def test_qparams_symmetric_unsigned_uses_max() -> None:
    s, z = qparams_from_range(torch.tensor([-3.0]), torch.tensor([1.5]), 0, 15, True)
    assert torch.allclose(s, torch.tensor([0.1])) and torch.equal(z, torch.zeros(1))


def test_qparams_asymmetric() -> None:
    lo, hi = torch.tensor([-1.0, 0.5, -4.0]), torch.tensor([3.0, 2.0, -1.0])
    s, z = qparams_from_range(lo, hi, 0, 255, False)
    # The range is widened to contain 0: [0, 2] for the second row, [-4, 0] for the third.
    assert torch.allclose(s, torch.tensor([4.0, 2.0, 4.0]) / 255)
    assert torch.equal(z, torch.tensor([64.0, 0.0, 255.0]))


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-100, 100, width=32),
    width=st.floats(0, 100, width=32),
    bits=st.integers(2, 8),
    signed=st.booleans(),
)
def test_qparams_asymmetric_zero_point_exact_and_in_range(
    lo: float, width: float, bits: int, signed: bool
) -> None:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s, z = qparams_from_range(torch.tensor([lo]), torch.tensor([lo + width]), qmin, qmax, False)
    assert torch.all(s >= SCALE_EPS) and torch.isfinite(s).all()
    assert torch.equal(z, torch.round(z)) and qmin <= z.item() <= qmax
    # 0 is representable exactly: quantize(0) dequantizes to 0.
    q0 = torch.clamp(torch.round(torch.zeros(1) / s) + z, qmin, qmax)
    assert torch.equal((q0 - z) * s, torch.zeros(1))


def test_qparams_zero_range_gives_eps_scale() -> None:
    for sym in (True, False):
        s, z = qparams_from_range(torch.zeros(3), torch.zeros(3), -8, 7, sym)
        assert torch.equal(s, torch.full((3,), SCALE_EPS)) and torch.isfinite(1 / s).all()


def test_lsq_init_scale() -> None:
    rows = torch.tensor([[1.0, -3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = lsq_init_scale(rows, 7)
    assert torch.allclose(s[0], torch.tensor(2 * 1.5 / 7**0.5))
    assert s[1] == SCALE_EPS


# ---------------------------------------------------------------- observers
def test_finite_replaces_nonfinite_by_zero() -> None:
    x = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), -2.0])
    assert torch.equal(finite(x), torch.tensor([1.0, 0.0, 0.0, 0.0, -2.0]))


def test_minmax_accumulates_per_row() -> None:
    obs = MinMaxObserver((2,))
    assert obs.initialized == 0
    obs.update(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]))
    assert torch.equal(obs.min_val, torch.tensor([1.0, -1.0])) and torch.equal(
        obs.max_val, torch.tensor([3.0, 0.5])
    )
    assert obs.initialized == 1
    obs.update(torch.tensor([[-4.0, 2.0, 2.5], [0.0, 0.0, 0.1]]))
    assert torch.equal(obs.min_val, torch.tensor([-4.0, -1.0])) and torch.equal(
        obs.max_val, torch.tensor([3.0, 0.5])
    )


def test_first_update_is_not_mixed_with_the_zero_init() -> None:
    obs = MinMaxObserver((1,))
    obs.update(torch.tensor([[2.0, 5.0]]))  # a naive min with the zero buffer would give 0
    assert obs.min_val.item() == 2.0 and obs.max_val.item() == 5.0


def test_non_accumulating_observer_tracks_the_latest_tensor() -> None:
    obs = MinMaxObserver((1,), accumulate=False)
    obs.update(torch.tensor([[-5.0, 5.0]]))
    obs.update(torch.tensor([[-1.0, 2.0]]))
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 2.0


def test_observer_reshapes_to_stat_shape() -> None:
    obs = MinMaxObserver((2, 3, 1))
    obs.update(torch.arange(24.0).reshape(6, 4))
    assert obs.min_val.shape == (2, 3, 1)
    assert torch.equal(obs.max_val.flatten(), torch.arange(3.0, 24.0, 4.0))


def test_ema_observer() -> None:
    obs = EMAObserver((1,), decay=0.75)
    obs.update(torch.tensor([[-2.0, 4.0]]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 4.0  # first batch taken as is
    obs.update(torch.tensor([[-6.0, 0.0]]))
    assert torch.allclose(obs.min_val, torch.tensor([0.75 * -2.0 + 0.25 * -6.0]))
    assert torch.allclose(obs.max_val, torch.tensor([0.75 * 4.0 + 0.25 * 0.0]))


def test_percentile_observer_matches_quantile_and_ignores_outliers() -> None:
    rows = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([1000.0])])[None]
    obs = PercentileObserver((1,), percentile=99.0)
    obs.update(rows)
    q = torch.quantile(rows[0], torch.tensor([0.01, 0.99]))
    assert torch.allclose(obs.min_val, q[:1]) and torch.allclose(obs.max_val, q[1:])
    assert obs.max_val.item() < 2.0  # the outlier does not set the range
    full = PercentileObserver((1,), percentile=100.0)
    full.update(rows)
    assert full.max_val.item() == 1000.0 and full.min_val.item() == -1.0


def test_percentile_observer_averages_batches() -> None:
    obs = PercentileObserver((1,), decay=0.5, percentile=100.0)
    obs.update(torch.tensor([[0.0, 2.0]]))
    obs.update(torch.tensor([[0.0, 4.0]]))
    assert torch.allclose(obs.max_val, torch.tensor([3.0]))


@pytest.mark.parametrize(("qmin", "qmax", "sym"), [(-8, 7, True), (0, 15, False), (-2, 1, True)])
def test_mse_observer_beats_minmax_on_heavy_tails(qmin: int, qmax: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 512, generator=g)
    rows[:, 0] = torch.tensor([8.0, -7.0, 9.0])  # one outlier per row
    obs = MSEObserver((3,), qmin, qmax, sym)
    obs.update(rows)
    lo, hi = obs.min_val, obs.max_val
    mn, mx = rows.amin(1), rows.amax(1)
    assert torch.all(lo >= mn - 1e-6) and torch.all(hi <= mx + 1e-6)
    assert torch.all(hi - lo < 0.9 * (mx - mn))  # the outliers are clipped
    assert torch.all(_mse(rows, lo, hi, qmin, qmax, sym) <= _mse(rows, mn, mx, qmin, qmax, sym))


def test_mse_observer_keeps_full_range_for_uniform_data() -> None:
    rows = torch.linspace(-1, 1, 257)[None]
    obs = MSEObserver((1,), -128, 127, True)
    obs.update(rows)
    assert obs.max_val.item() > 0.9


@pytest.mark.parametrize("kind", ["minmax", "ema", "percentile", "mse"])
def test_non_finite_values_are_ignored(kind: str) -> None:
    obs = make_observer(
        kind, (1,), accumulate=True, qmin=-128, qmax=127, symmetric=True, ema_decay=0.9, percentile=100.0
    )
    obs.update(torch.tensor([[-1.0, 0.5, 2.0]]))
    obs.update(torch.tensor([[float("inf"), -float("inf"), float("nan")]]))
    assert torch.isfinite(obs.min_val).all() and torch.isfinite(obs.max_val).all()
    assert obs.max_val.item() <= 2.0 and obs.min_val.item() >= -1.0
    fresh = make_observer(
        kind, (1,), accumulate=True, qmin=-128, qmax=127, symmetric=True, ema_decay=0.9, percentile=100.0
    )
    fresh.update(torch.tensor([[float("nan"), 3.0, -float("inf"), -1.0]]))
    assert (
        torch.isfinite(fresh.min_val).all() and fresh.max_val.item() <= 3.0 and fresh.min_val.item() >= -1.0
    )


def test_minmax_range_unchanged_by_a_nonfinite_batch() -> None:
    obs = MinMaxObserver((1,))
    obs.update(torch.tensor([[-1.0, 2.0]]))
    obs.update(torch.tensor([[float("inf"), float("nan")]]))
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 2.0


@pytest.mark.parametrize("kind", ["minmax", "ema", "percentile", "mse"])
def test_observer_state_dict_round_trip(kind: str) -> None:
    def build():
        return make_observer(
            kind, (2,), accumulate=True, qmin=0, qmax=255, symmetric=False, ema_decay=0.8, percentile=99.0
        )

    a = build()
    a.update(torch.randn(2, 64))
    a.update(torch.randn(2, 64) * 3)
    sd = a.state_dict()
    assert set(sd) == {"min_val", "max_val", "initialized"}
    b = build()
    b.load_state_dict(sd)
    for k in sd:
        assert torch.equal(getattr(a, k), getattr(b, k))


def test_make_observer_builds_the_mapped_classes() -> None:
    kw = dict(accumulate=False, qmin=-8, qmax=7, symmetric=True, ema_decay=0.5, percentile=99.5)
    assert type(make_observer("minmax", (1,), **kw)) is MinMaxObserver
    ema = make_observer("ema", (1,), **kw)
    assert type(ema) is EMAObserver and ema.decay == 0.5 and not ema.accumulate
    pct = make_observer("percentile", (1,), **kw)
    assert type(pct) is PercentileObserver and pct.percentile == 99.5
    mse = make_observer("mse", (1,), **kw)
    assert type(mse) is MSEObserver and (mse.qmin, mse.qmax, mse.symmetric) == (-8, 7, True)


def test_make_observer_unknown_kind() -> None:
    with pytest.raises(
        ValueError, match=r"scale: 'lsq' has no observer; allowed: minmax, ema, percentile, mse"
    ):
        make_observer(
            "lsq", (1,), accumulate=True, qmin=-8, qmax=7, symmetric=True, ema_decay=0.9, percentile=99.0
        )
