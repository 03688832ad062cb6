"""QATSchedule: float warm-up, observer freezing and BN freezing follow global_step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.train.schedule import QATSchedule


def _model():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    return qat.prepare(m, {"weight": {"format": "int8", "granularity": "per_channel"},
                           "activation": {"format": "int8", "scale": "ema", "symmetric": False}})  # fmt: skip


def test_phases_follow_the_step():
    s = QATSchedule(float_warmup_steps=5, freeze_observers_step=10, freeze_bn_step=8)
    assert s.phase(0) == {"fake_quant": False, "observers": True, "bn_frozen": False}
    assert s.phase(5) == {"fake_quant": True, "observers": True, "bn_frozen": False}
    assert s.phase(9) == {"fake_quant": True, "observers": True, "bn_frozen": True}
    assert s.phase(10) == {"fake_quant": True, "observers": False, "bn_frozen": True}


def test_apply_sets_flags_buffers_and_bn_mode():
    m = _model().train()
    s = QATSchedule(float_warmup_steps=2, freeze_observers_step=4, freeze_bn_step=4)
    qs = [q for _, q in qat.quantizers(m)]
    s.apply(m, 0)
    assert all(not q.fake_quant_on and int(q.fake_quant_enabled) == 0 for q in qs)
    m.train()
    s.apply(m, 4)
    assert all(q.fake_quant_on and int(q.fake_quant_enabled) == 1 for q in qs)
    assert all(not q.observer_on and int(q.observer_enabled) == 0 for q in qs if q.observer is not None)
    assert not m[1].training
    # Frozen observers keep their range however extreme the next batch is.
    act = m[0].input_quant
    before = act.observer.max_val.clone()
    m(torch.full((2, 1, 8, 8), 1e3))
    assert torch.equal(act.observer.max_val, before)


def test_warmup_output_equals_float_model():
    m = _model().eval()
    ref = qat.unprepare(_copy(m))
    QATSchedule(float_warmup_steps=100).apply(m, 0)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(m(x), ref(x))


def _copy(m):
    import copy

    return copy.deepcopy(m)


@pytest.mark.parametrize("key", ["float_warmup_steps", "freeze_observers_step", "freeze_bn_step"])
def test_negative_steps_are_rejected(key):
    with pytest.raises(ValueError, match=f"schedule.{key}: -1 is not valid"):
        QATSchedule(**{key: -1})
