"""Bit-width annealing: the schedule moves int quantizers 8 -> 4 -> 2 (never below their configured width),
qmin/qmax follow through Python mirrors, state carries over sensibly, and the width survives checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import prepare, quantizers
from qat.runs import load_run
from qat.train.job import run
from qat.train.schedule import QATSchedule

BITS = [[0, 8], [10, 4], [20, 2]]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _prepared() -> nn.Module:
    cfg = {
        "weight": {"format": "int2", "granularity": "per_channel", "scale": "lsq"},
        "activation": {"format": "int2", "symmetric": False, "scale": "lsq"},
        "overrides": {"0": {"weight": {"format": "int8"}, "activation": {"format": "int8"}}},
    }
    m = prepare(_model(), cfg).train()
    m(torch.randn(8, 16))  # initialise the learned scales at the configured widths
    return m


def _widths(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {n: (q.bits, q.qmin, q.qmax) for n, q in quantizers(model)}


def test_schedule_anneals_weights_and_keeps_wider_layers() -> None:
    m = _prepared()
    sched = QATSchedule(bits=BITS)
    sched.apply(m, 0)
    w = _widths(m)
    assert w["2.weight_quant"] == (8, -128, 127) and w["0.weight_quant"] == (8, -128, 127)
    assert w["2.input_quant"] == (2, -2, 1)  # activations are not annealed without activation_bits
    sched.apply(m, 15)
    assert _widths(m)["2.weight_quant"] == (4, -8, 7)
    assert m[2].weight_quant.spec.format == "int4"  # the exporter and the size report read the spec
    sched.apply(m, 10**6)
    assert _widths(m)["2.weight_quant"] == (2, -2, 1) and _widths(m)["0.weight_quant"] == (8, -128, 127)


def test_activation_bits_anneal_unsigned_and_asymmetric_grids() -> None:
    m = _prepared()
    QATSchedule(activation_bits=[[0, 8], [5, 3]]).apply(m, 7)
    q = m[2].input_quant
    assert (q.bits, q.qmin, q.qmax, q.spec.format) == (3, -4, 3, "int3")
    assert m[2].weight_quant.bits == 2


def test_forward_uses_the_new_grid() -> None:
    m = _prepared()
    x = torch.randn(64, 16)
    QATSchedule(bits=[[0, 8]]).apply(m, 0)
    q = m[2].weight_quant
    codes, _, _ = q.quantize(m[2].weight)
    assert codes.min() < -2 or codes.max() > 1  # 8-bit codes, not the configured 2-bit ones

    def levels() -> int:  # most distinct values in one output channel (one scale per channel)
        return max(row.unique().numel() for row in m[2].quantized_weight().detach())

    assert 4 < levels() <= 256
    QATSchedule(bits=[[0, 2]]).apply(m, 0)
    assert levels() <= 4
    assert torch.isfinite(m(x)).all()


def test_lsq_step_follows_its_init_rule_and_observers_recompute() -> None:
    w = torch.randn(8, 16)
    q = FakeQuantizer(QuantSpec(format="int2", granularity="per_channel", scale="lsq"), "weight", w.shape)
    q(w)
    q.set_bits(8)
    assert torch.allclose(q.scale.detach(), 2 * w.abs().mean(dim=1) / math.sqrt(127))  # LSQ init at 8 bit
    obs = FakeQuantizer(QuantSpec(format="int8", scale="minmax"), "activation").train()
    obs(torch.linspace(-1, 3, 50))
    obs.set_bits(4)
    assert torch.allclose(obs.scale, torch.tensor([3.0 / 7]))  # recomputed from the observed range


def test_lsq_plus_and_pact_keep_their_range() -> None:
    x = torch.rand(4, 32) * 3 - 0.5
    lsqp = FakeQuantizer(QuantSpec(format="int8", scale="lsq", symmetric=False), "activation").train()
    lsqp(x)
    with torch.no_grad():
        lo = float((lsqp.qmin - lsqp.zero_point) * lsqp.scale)
        hi = float((lsqp.qmax - lsqp.zero_point) * lsqp.scale)
    lsqp.set_bits(4)
    s, z = float(lsqp.scale), float(lsqp.zero_point)
    assert z == round(z) and lsqp.qmin <= z <= lsqp.qmax
    assert abs((lsqp.qmin - z) * s - lo) <= s / 2 + 1e-6 and abs((lsqp.qmax - z) * s - hi) <= s / 2 + 1e-6
    pact = FakeQuantizer(QuantSpec(format="uint8", scale="pact"), "activation").train()
    pact(x)
    alpha = float(pact.scale) * 255
    pact.set_bits(2)
    assert math.isclose(float(pact.scale) * 3, alpha, rel_tol=1e-6)


def test_width_survives_state_dict_round_trip_and_fresh_prepare() -> None:
    m = _prepared()
    QATSchedule(bits=BITS, activation_bits=[[0, 6]]).apply(m, 12)
    sd = copy.deepcopy(m.state_dict())
    assert sd["2.weight_quant.num_bits"] == 4 and sd["2.input_quant.num_bits"] == 6
    fresh = _prepared()
    fresh.load_state_dict(sd)
    assert _widths(fresh) == _widths(m)
    x = torch.randn(8, 16)
    assert torch.equal(fresh.eval()(x), m.eval()(x))
    # And back: a checkpoint from before any annealing restores the configured widths.
    fresh.load_state_dict(_prepared().state_dict())
    assert fresh[2].weight_quant.bits == 2 and "2.weight_quant.num_bits" not in fresh.state_dict()


def test_non_int_quantizers_are_left_alone_and_set_bits_refuses_them() -> None:
    m = prepare(_model(), {"weight": {"format": "ternary", "scale": "twn"}})
    QATSchedule(bits=BITS).apply(m, 0)
    assert all(q.bits is None and q.spec.format == "ternary" for _, q in quantizers(m))
    with pytest.raises(QuantConfigError, match=r"schedule.bits: layer '0' has format ternary"):
        m[0].weight_quant.set_bits(4)


@pytest.mark.parametrize(
    "bits",
    [[[0, 9]], [[5, 4], [5, 2]], [[0, 4], 3], "8", [[-1, 4]], [], [[0, 4.5]], [[0, True]]],
)
def test_bad_bit_schedules_fail_with_one_line_naming_the_key(bits) -> None:
    needle = r"^schedule.bits: .* is not valid; allowed: a list of \[step, bits\]"
    with pytest.raises(ValueError, match=needle):
        QATSchedule(bits=bits)


def test_annealed_run_checkpoints_and_reloads_at_the_final_width(make_cfg) -> None:
    cfg = make_cfg(
        "recipe=digits_anneal",
        "debug=fast",
        "logger=none",
        "export.enabled=false",
        "schedule.bits=[[0,8],[2,4],[3,2]]",
        "schedule.activation_bits=[[0,8],[2,3]]",
    )
    metrics = run(cfg)
    restored = load_run(cfg.paths.output_dir)
    conv2 = restored.model.conv2
    assert (conv2.weight_quant.bits, conv2.input_quant.bits) == (2, 3)
    assert restored.model.conv1.weight_quant.bits == 8  # configured at int8: never annealed below
    assert metrics["config"]["schedule"]["bits"] == [[0, 8], [2, 4], [3, 2]]  # recorded with the run
