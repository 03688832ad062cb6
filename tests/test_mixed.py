"""Automatic mixed precision: sensitivities, the exact budgeted assignment (checked against brute force), and
the written quant config (loads, prepares, and gives each layer its width)."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat.config import QuantConfig, QuantConfigError
from qat.mixed import LayerSensitivity, assign_bits, auto_mixed, measure_sensitivity, write_quant_config
from qat.rewrite import prepare

BASE = QuantConfig.from_dict(
    {
        "weight": {"format": "int4", "granularity": "per_channel", "scale": "lsq"},
        "activation": {"format": "int8", "symmetric": False, "scale": "ema"},
        "overrides": {"head": {"weight": {"format": "int8"}}},
    }
)


class Tiny(nn.Module):
    """Three searched layers of very different sizes and a head that a base-config override pins."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(8, 16)
        self.wide = nn.Linear(16, 64)
        self.big = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.big(torch.relu(self.wide(torch.relu(self.small(x)))))))


@pytest.fixture
def tiny_and_batches():
    torch.manual_seed(0)
    model = Tiny()
    xs = [torch.randn(32, 8) for _ in range(3)]
    with torch.no_grad():  # labels the float model gets right, so quantization can only raise the loss
        return model, [(x, model(x).argmax(-1)) for x in xs]


def test_sensitivity_is_positive_falls_with_bits_and_restores_the_model(tiny_and_batches) -> None:
    model, batches = tiny_and_batches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers, pinned = measure_sensitivity(model, batches, BASE, [2, 4, 8])
    assert [layer.name for layer in layers] == ["small", "wide", "big"] and pinned == ["head"]
    assert [layer.params for layer in layers] == [128, 1024, 4096]
    for layer in layers:
        assert all(v >= 0 for v in layer.scores.values())
        assert layer.scores[2] > layer.scores[4] > layer.scores[8]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    loss_layers, _ = measure_sensitivity(model, batches, BASE, [2, 8], metric="loss")
    assert abs(loss_layers[2].scores[2]) > abs(loss_layers[2].scores[8])  # a loss change, either sign


def _brute_force(layers: list[LayerSensitivity], budget: float, cands: list[int]) -> float:
    total = sum(layer.params for layer in layers)
    best = float("inf")
    for combo in itertools.product(cands, repeat=len(layers)):
        if sum(b * layer.params for b, layer in zip(combo, layers, strict=True)) <= budget * total + 1e-9:
            best = min(best, sum(layer.scores[b] for b, layer in zip(combo, layers, strict=True)))
    return best


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(st.integers(1, 40).map(lambda k: 16 * k), min_size=1, max_size=5),
    budget=st.floats(2.0, 8.0),
    seed=st.integers(0, 10_000),
)
def test_assignment_is_optimal_and_meets_the_budget(params: list[int], budget: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cands = [2, 3, 4, 8]
    layers = []
    for i, n in enumerate(params):
        raw = torch.rand(len(cands), generator=g).sort(descending=True).values.tolist()
        layers.append(LayerSensitivity(f"l{i}", n, dict(zip(cands, raw, strict=True))))
    bits = assign_bits(layers, budget, cands)
    total = sum(n for n in params)
    assert sum(bits[layer.name] * layer.params for layer in layers) <= budget * total + 1e-9
    damage = sum(layer.scores[bits[layer.name]] for layer in layers)
    assert damage == pytest.approx(_brute_force(layers, budget, cands))


def test_budget_below_the_smallest_width_is_rejected() -> None:
    layers = [LayerSensitivity("a", 10, {2: 1.0, 4: 0.5})]
    with pytest.raises(QuantConfigError, match=r"budget.bits_per_weight: 1.5 is not valid; allowed: >= 2"):
        assign_bits(layers, 1.5, [2, 4])


def test_assignment_beats_uniform_width_and_config_round_trips(tiny_and_batches, tmp_path) -> None:
    model, batches = tiny_and_batches
    result = auto_mixed(model, batches, BASE, bits_per_weight=3.0, candidates=[2, 3, 4, 8])
    assert result.bits_per_weight <= 3.0 + 1e-9
    assert set(result.bits) == {"small", "wide", "big"} and result.pinned == ["head"]
    uniform = sum(layer.scores[3] for layer in result.layers)  # uniform int3 also meets the budget
    assert result.predicted_damage <= uniform
    path = write_quant_config(tmp_path / "quant" / "mixed_w3.yaml", result)
    text = path.read_text()
    assert text.startswith("# Automatic mixed precision") and "quant=mixed_w3" in text
    loaded = yaml.safe_load(text)
    assert loaded["name"] == "mixed_w3" and loaded["overrides"]["head"] == {"weight": {"format": "int8"}}
    cfg = QuantConfig.from_dict(loaded)
    prepared = prepare(Tiny(), cfg)
    widths = {r.name: r.weight.split()[0] for r in prepared.qat_report.quantized}
    assert widths == {**{k: f"int{b}" for k, b in result.bits.items()}, "head": "int8"}
    assert all(r.activation.startswith("int8") for r in prepared.qat_report.quantized)


def test_non_int_base_weight_is_rejected(tiny_and_batches) -> None:
    model, batches = tiny_and_batches
    base = QuantConfig.from_dict({"weight": {"format": "ternary"}})
    with pytest.raises(QuantConfigError, match=r"quant.weight.format: 'ternary' is not valid for mixed"):
        auto_mixed(model, batches, base, bits_per_weight=3.0)
    with pytest.raises(QuantConfigError, match=r"mixed.candidates: \[1, 4\] is not valid"):
        auto_mixed(model, batches, BASE, bits_per_weight=3.0, candidates=[1, 4])
