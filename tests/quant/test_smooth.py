"""SmoothQuant (``quant.smooth``): the factors, the exact reparametrisation, calibration order, config."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat.calibrate import calibrate
from qat.config import QuantConfigError
from qat.quant.smooth import Smoother

W8A8 = {
    "weight": {"format": "int8", "granularity": "per_channel"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
}
MINMAX = dict(W8A8, activation=dict(W8A8["activation"], scale="minmax"))  # running range over the batches


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """Inputs with two outlier channels, as LayerNorm outputs of transformers have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(32, 16, generator=g)
        x[:, 3] *= 40.0
        x[:, 11] *= 15.0
        out.append((x,))
    return out


def test_fit_is_the_smoothquant_formula_with_a_floor_for_dead_channels():
    sm = Smoother(3, alpha=0.75)
    act = torch.tensor([8.0, 1.0, 0.0])
    w = torch.tensor([[0.5, -2.0, 1.0], [-1.0, 0.25, 0.0]])  # column max |w|: 1, 2, 1
    sm.fit(act, w)
    want = torch.tensor([8.0**0.75 / 1.0**0.25, 1.0 / 2.0**0.25, 1e-5**0.75 / 1.0])
    torch.testing.assert_close(sm.scale, want)
    assert bool(sm.calibrated)


def test_smoothing_alone_is_an_exact_reparametrisation():
    model, batches = _model(), _data()
    q = qat.prepare(copy.deepcopy(model), dict(W8A8, smooth=0.5))
    for fq in qat.quantizers(q):
        fq[1].enable_fake_quant(False)
    calibrate(q, batches)
    assert all(bool(m.smooth.calibrated) for m in (q[0], q[2]))
    assert not torch.allclose(q[0].smooth.scale, torch.ones(16))  # the outlier channels moved
    x = batches[0][0]
    torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)


def test_smoothing_cuts_the_static_int8_error_on_outlier_channels():
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Linear(16, 32)), _data()
    errors = {}
    for alpha in (None, 0.8):
        q = qat.prepare(copy.deepcopy(model), dict(MINMAX, smooth=alpha))
        calibrate(q, batches)
        with torch.no_grad():
            errors[alpha] = sum(float((q.eval()(x) - model(x)).square().mean()) for (x,) in batches)
    assert errors[0.8] < 0.25 * errors[None], errors


def test_factors_are_fitted_once_and_the_observers_see_smoothed_inputs():
    q = qat.prepare(_model(), dict(MINMAX, smooth=0.8))
    calibrate(q, iter(_data()), 2)  # a one-shot iterator: both passes must see the same batches
    first = q[0].smooth.scale.clone()
    scaled = torch.cat([x for (x,) in _data()[:2]]) / first
    assert float(q[0].input_quant.observer.max_val) == pytest.approx(float(scaled.max()), rel=1e-5)
    calibrate(q, _data(2, seed=5))  # later calibrations keep the fitted factors
    torch.testing.assert_close(q[0].smooth.scale, first)


def test_state_dict_round_trip_keeps_the_factors():
    q = qat.prepare(_model(), dict(W8A8, smooth=0.8))
    calibrate(q, _data())
    fresh = qat.prepare(_model(), dict(W8A8, smooth=0.8))
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh[0].smooth.calibrated)
    x = _data(1, seed=3)[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q.eval()(x))


def test_only_layers_with_both_sides_quantized_get_factors_and_overrides_turn_them_off():
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
    cfg = dict(W8A8, smooth=0.8, overrides={"3": {"smooth": None}, "2": {"activation": None}})
    q = qat.prepare(model, cfg)
    assert q[2].smooth is None and q[3].smooth is None  # float input / turned off
    assert not hasattr(q[0], "smooth") or q[0].smooth is None  # convolutions are not smoothed
    q2 = qat.prepare(nn.Sequential(nn.Linear(4, 8)), dict(W8A8, smooth=0.8))
    assert "smooth(0.8)" in str(q2.qat_report)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.2, "high", True])
def test_bad_alpha_is_a_one_line_error_naming_the_key(bad):
    with pytest.raises(QuantConfigError, match=r"^quant\.smooth: .* allowed: a number in \(0, 1\]"):
        qat.prepare(_model(), dict(W8A8, smooth=bad))
    with pytest.raises(QuantConfigError, match=r"^quant\.overrides\.0\.smooth: "):
        qat.prepare(_model(), dict(W8A8, overrides={"0": {"smooth": bad}}))


def test_calibration_without_batches_is_refused():
    q = qat.prepare(_model(), dict(W8A8, smooth=0.8))
    with pytest.raises(ValueError, match="needs at least one calibration batch"):
        calibrate(q, [])
