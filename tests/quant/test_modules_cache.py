"""The eval path keeps each layer's integer GEMM operand (weight codes, sums, scales, packed weight) while the
layer's state is unchanged, and rebuilds it after anything that changes that state: an optimizer step,
``load_state_dict``, a scale or bit-width change, ``.to()``. Each invalidation test changes the state in a
way that changes the output, then checks the output against a deep copy (which starts with an empty cache):
a stale operand gives the old output and fails it.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import qat
from qat.quant import intgemm

W8A8_LSQ = {  # the packaged w8a8 preset: LSQ weights, static asymmetric activations
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "lsq"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
}
# Off the integer path (int4 weights per group of 2): the fake-quantized weight itself is kept in eval.
W4G2_LSQ = {
    "weight": {"format": "int4", "granularity": "per_group", "group_size": 2, "scale": "lsq"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
}
PATHS = {"integer": W8A8_LSQ, "fake quant": W4G2_LSQ}
W8A8_MINMAX = {
    "weight": {"format": "int8", "granularity": "per_channel"},
    "activation": {"format": "int8", "granularity": "per_tensor", "scale": "ema"},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x[:, :8].reshape(-1, 2, 2, 2)).flatten(1)  # [B, 16]
        return self.fc2(torch.relu(self.fc1(x + y)))


def _prepared(cfg: dict) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = qat.prepare(Net(), cfg)
    x = torch.randn(8, 16)
    qat.calibrate(model, [(x,)], num_batches=1)
    return model.eval(), x


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts operand builds (one ``int_weight`` call per layer and build)."""
    calls: list[int] = []
    real = intgemm.int_weight
    intgemm.onednn_exact()  # its one-off probe builds operands of its own

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(intgemm, "int_weight", counting)
    return calls


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_the_operand_is_built_once_while_the_model_is_unchanged(builds: list[int]) -> None:
    model, x = _prepared(W8A8_LSQ)
    first = _eval(model, x)
    assert len(builds) == 3  # fc1, fc2, conv
    for _ in range(3):
        assert torch.equal(_eval(model, x), first)
    assert len(builds) == 3
    assert torch.equal(first, _eval(copy.deepcopy(model), x))  # a fresh build gives the same bits


def _weight_quantizer_calls(model: nn.Module) -> list[str]:
    """Names of the layers whose weight quantizer runs, one entry per call (forward hooks)."""
    calls: list[str] = []
    for name, m in model.named_modules():
        if getattr(m, "weight_quant", None) is not None:
            m.weight_quant.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def test_off_the_integer_path_the_fake_quantized_weight_is_kept() -> None:
    """Layers the integer GEMM does not cover (here int4 per group; llama.cpp's block rules) keep their
    fake-quantized weight in eval: the weight quantizer runs once per state, with autograd every time."""
    model, x = _prepared(W4G2_LSQ)
    assert not intgemm.weight_int_ok("int", "per_group", 0, 2, False)  # the float fake-quant path
    calls = _weight_quantizer_calls(model)
    first = _eval(model, x)
    assert sorted(calls) == ["conv", "fc1", "fc2"]
    for _ in range(3):
        assert torch.equal(_eval(model, x), first)
    assert len(calls) == 3
    assert torch.equal(first, _eval(copy.deepcopy(model), x))
    model(x)  # autograd on: the quantizers run (and their gradients flow)
    assert sorted(set(calls[3:])) == ["conv", "fc1", "fc2"]


def test_an_embedding_keeps_its_fake_quantized_table() -> None:
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Embedding(10, 8)), {"weight": W4G2_LSQ["weight"]}).eval()
    calls, ids = _weight_quantizer_calls(model), torch.arange(10)
    first = _eval(model, ids)
    assert torch.equal(_eval(model, ids), first) and len(calls) == 1
    with torch.no_grad():
        model[0].weight.mul_(-1.0)
    after = _eval(model, ids)
    assert not torch.equal(after, first) and len(calls) == 2
    assert torch.equal(after, _eval(copy.deepcopy(model), ids))


def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    model.eval()


def _adam_fused_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    model(x).square().sum().backward()
    opt.step()
    model.eval()


def _load_copied(model: nn.Module, x: torch.Tensor) -> None:
    other = copy.deepcopy(model)
    _sgd_step(other, x)
    model.load_state_dict(other.state_dict())


def _load_assigned(model: nn.Module, x: torch.Tensor) -> None:
    other = copy.deepcopy(model)
    _sgd_step(other, x)
    model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)


def _learned_scale_step(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.fc1.weight_quant.scale.mul_(1.7)


def _activation_scale(model: nn.Module, x: torch.Tensor) -> None:
    """The activation side (codes, offsets, rescale) is cached too, on the input quantizer's state."""
    with torch.no_grad():
        model.fc1.input_quant.scale.mul_(1.5)


def _bits(model: nn.Module, x: torch.Tensor) -> None:
    model.fc1.weight_quant.set_bits(3)


def _in_place_weight_write(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.conv.weight.mul_(-1.0)


CHANGES: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "sgd_step": _sgd_step,
    "adam_fused_step": _adam_fused_step,
    "load_state_dict": _load_copied,
    "load_state_dict_assign": _load_assigned,
    "learned_scale": _learned_scale_step,
    "activation_scale": _activation_scale,
    "set_bits": _bits,
    "in_place_weight_write": _in_place_weight_write,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_state_change_rebuilds_the_operand(change: str, path: str) -> None:
    model, x = _prepared(PATHS[path])
    before = _eval(model, x)
    CHANGES[change](model, x)
    after = _eval(model, x)
    assert not torch.equal(after, before), "the change must change the output, or the test proves nothing"
    assert torch.equal(after, _eval(copy.deepcopy(model), x))


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_folded_batchnorm_statistics_are_part_of_the_state() -> None:
    """Conv-BN folding quantizes ``W * gamma / std``: new running statistics (a training step) rebuild."""
    torch.manual_seed(0)
    model = qat.prepare(ConvBn(), {**W8A8_MINMAX, "fold_bn": True})
    x = torch.randn(4, 2, 5, 5)
    qat.calibrate(model, [(x,)], num_batches=1)
    before = _eval(model.eval(), x)
    model.train()
    with torch.no_grad():
        model(3.0 * x + 1.0)  # BN running statistics move (no optimizer involved)
    after = _eval(model.eval(), x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _eval(copy.deepcopy(model), x))


def test_smoothquant_factors_are_part_of_the_state() -> None:
    model, x = _prepared({**W8A8_MINMAX, "smooth": 0.5})
    before = _eval(model, x)
    model.fc1.smooth.scale.mul_(2.0)
    after = _eval(model, x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _eval(copy.deepcopy(model), x))


def test_a_weight_observer_follows_the_weight() -> None:
    """minmax weight scales: the observer's range (and so the scale) follows a changed weight."""
    model, x = _prepared(W8A8_MINMAX)
    before = _eval(model, x)
    scale = model.fc1.weight_quant.scale.clone()
    with torch.no_grad():
        model.fc1.weight.mul_(3.0)
    after = _eval(model, x)
    assert torch.allclose(model.fc1.weight_quant.scale, 3.0 * scale)
    assert not torch.equal(after, before)
    assert torch.equal(after, _eval(copy.deepcopy(model), x))


def test_to_rebuilds_the_operand(builds: list[int]) -> None:
    model, x = _prepared(W8A8_LSQ)
    first = _eval(model, x)
    model.to(torch.float64)
    # emptied, not left to the key: the next .to() may put new storage at the freed address of the old
    assert all(m.operand_cache("weight").key is None for m in (model.fc1, model.fc2, model.conv))
    model.to(torch.float32)  # new storage for every tensor, same values
    assert torch.equal(_eval(model, x), first)
    assert len(builds) == 6
    model.half().float()  # the weights are rounded to float16: a stale operand keeps the old values
    assert torch.equal(_eval(model, x), _eval(copy.deepcopy(model), x))
    assert not torch.equal(_eval(model, x), first)


def test_training_mode_and_autograd_bypass_the_cache(builds: list[int]) -> None:
    model, x = _prepared(W8A8_LSQ)
    model.train()
    model(x).sum().backward()
    model.eval()
    model(x)  # grad enabled: the float fake-quant forward
    assert builds == []


def test_copies_and_pickles_start_empty() -> None:
    model, x = _prepared(W8A8_LSQ)
    y = _eval(model, x)  # fills the caches (on CPU with oneDNN: an opaque packed tensor, not copyable)
    assert model.fc1.operand_cache("weight").key is not None
    clone = copy.deepcopy(model)
    assert clone.fc1.operand_cache("weight").key is None
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.fc1.operand_cache("weight").key is None
    assert torch.equal(_eval(clone, x), y) and torch.equal(_eval(loaded, x), y)


def test_inference_mode_tensors_are_not_cached(builds: list[int]) -> None:
    """Inference tensors have no version counter: such a layer rebuilds its operand on every call."""
    with torch.inference_mode():
        model, x = _prepared(W8A8_LSQ)
        y = model(x)
        assert torch.equal(model(x), y)
    assert len(builds) == 6
