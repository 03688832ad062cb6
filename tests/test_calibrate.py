"""calibrate(): observers and learned scales initialise from data; the model itself is left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qat.calibrate import calibrate
from qat.rewrite import prepare, quantizers


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _batches(n: int = 3):
    return [(torch.randn(4, 1, 6, 6) * (i + 1), torch.randint(0, 5, (4,))) for i in range(n)]


W4_LSQ = {"format": "int4", "granularity": "per_channel", "scale": "lsq"}


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model[1].state_dict().items()}


@pytest.mark.parametrize("train_mode", [True, False])
def test_calibrate_initialises_observers_and_leaves_the_model_alone(train_mode: bool) -> None:
    model = prepare(_cnn(), {"weight": W4_LSQ, "activation": {"format": "uint8", "symmetric": False}})
    model.train(train_mode)
    modes = {n: m.training for n, m in model.named_modules()}
    bn = _bn_state(model)
    params = {
        n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("weight_quant.scale")
    }
    batches = _batches()

    used = calibrate(model, batches)

    assert used == 3
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in _bn_state(model).items():
        assert torch.equal(v, bn[k]), k
    for n, p in model.named_parameters():
        if n in params:
            assert torch.equal(p.detach(), params[n]), n
        assert p.grad is None
    # The first layer's input observer saw every batch: its range is the union of the inputs.
    inq = model[0].input_quant
    xs = torch.cat([b[0] for b in batches])
    assert inq.observer.initialized == 1
    assert inq.observer.min_val.item() == xs.min().item() and inq.observer.max_val.item() == xs.max().item()
    assert torch.allclose(inq.scale, (xs.max() - xs.min()).reshape(1) / 255)
    # Learned weight scales are initialised from the weights.
    wq = model[5].weight_quant
    assert wq.initialized == 1 and wq.is_initialized
    assert torch.allclose(wq.scale.detach(), 2 * model[5].weight.detach().abs().mean(dim=1) / math.sqrt(7))


def test_calibrate_initialises_lsq_activation_scales() -> None:
    model = prepare(
        _cnn(), {"weight": W4_LSQ, "activation": {"format": "int4", "scale": "lsq", "symmetric": False}}
    )
    calibrate(model, _batches(1))
    for _, q in quantizers(model):
        assert q.is_initialized and q.initialized == 1
        assert torch.all(q.scale.detach() > 0)


def test_calibrate_respects_num_batches_and_custom_forward() -> None:
    model = prepare(_cnn(), {"weight": W4_LSQ, "activation": {"format": "int8"}})
    seen = []

    def forward(m, batch):
        seen.append(batch["x"].shape[0])
        return m(batch["x"])

    batches = ({"x": torch.randn(i + 1, 1, 6, 6), "meta": "keep"} for i in range(10))
    assert calibrate(model, batches, num_batches=2, forward=forward) == 2
    assert seen == [1, 2]
    assert calibrate(model, [], num_batches=5) == 0


def test_calibrate_accepts_bare_tensor_batches() -> None:
    model = prepare(_cnn(), {"weight": W4_LSQ, "activation": {"format": "int8", "scale": "ema"}})
    assert calibrate(model, [torch.randn(2, 1, 6, 6)]) == 1
    assert model[0].input_quant.observer.initialized == 1


def test_calibrate_restores_modes_after_an_error() -> None:
    model = prepare(_cnn(), {"weight": W4_LSQ, "activation": {"format": "int8"}}).train()

    def boom(m, batch):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        calibrate(model, _batches(1), forward=boom)
    assert all(m.training for m in model.modules())


def test_calibrate_keeps_frozen_observers_frozen() -> None:
    model = prepare(_cnn(), {"weight": {"format": "int8"}, "activation": {"format": "int8"}})
    calibrate(model, _batches(1))
    q = model[5].input_quant
    q.enable_observer(False)
    scale = q.scale.clone()
    calibrate(model, [(torch.randn(4, 1, 6, 6) * 100, None)])  # observers run during calibration ...
    assert not torch.equal(q.scale, scale)
    assert not q.observer_on and q.observer_enabled == 0  # ... and the frozen flag is restored afterwards
    assert model[0].input_quant.observer_on


def test_calibrate_without_grad() -> None:
    model = prepare(_cnn(), {"weight": W4_LSQ})
    out = []
    calibrate(model, _batches(1), forward=lambda m, b: out.append(m(b[0])))
    assert not out[0].requires_grad
