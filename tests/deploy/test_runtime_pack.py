"""The integer runtime prepares each weight once, at load: int8 codes one row per output (the column-major
operand ``_int_mm`` is fast with), row sums, offsets and scales as buffers, and the kernel's packed copy
(oneDNN, CPU) in an operand cache that ``.to()`` empties and no forward refills. Large batches take the
oneDNN kernel, small ones ``_int_mm``; both give the bits of the evaluated fake-quant model.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers.export_models import prepared_export
from torch import nn

import qat
from qat.quant import intgemm

W8A8 = {  # the packaged w8a8 preset: asymmetric static activations
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "lsq"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)  # [B, 64]
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = Net()
    batches = [(torch.randn(8, 1, 4, 4),) for _ in range(3)]
    out = tmp_path_factory.mktemp("pack") / "e"
    model, report = prepared_export(net, W8A8, batches, out)
    assert report.verification["passed"]
    return out, model


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = intgemm.pack
    intgemm.onednn_exact()  # its one-off probe packs weights of its own

    def counting(w, probe=True):
        calls.append(1)
        return real(w, probe)

    monkeypatch.setattr(intgemm, "pack", counting)
    return calls


def _layers(runtime: nn.Module) -> list[nn.Module]:
    return [runtime.conv, runtime.fc1, runtime.fc2]


def test_weights_are_packed_once_at_load_and_never_in_forward(exported, packs) -> None:
    out, model = exported
    runtime = qat.load_quantized(out, Net())
    assert all(m.uses_int_mm for m in _layers(runtime)) and len(packs) == 3
    assert runtime.fc1.w_int.shape == (48, 64)  # [N, K]: _int_mm reads w_int.t(), column-major
    if intgemm.onednn_exact():
        assert all(m._int_weight().packed is not None for m in _layers(runtime))
    with torch.no_grad():
        for rows in (1, 5, 300):  # both kernels: _int_mm below ONEDNN_MIN_ROWS, oneDNN from there on
            x = torch.randn(rows, 1, 4, 4)
            assert torch.equal(runtime(x), model(x))
            assert torch.equal(runtime(x)[:1], runtime(x[:1]))  # a sample's output ignores its batch
    assert len(packs) == 3
    assert not any("packed" in k for k in runtime.state_dict())


def test_to_empties_the_packed_weights_and_the_next_forward_repacks(exported, packs) -> None:
    out, model = exported
    runtime = qat.load_quantized(out, Net())
    runtime.to(torch.float32)  # an _apply: new storage may reuse a freed address
    assert all(m.operand_cache("weight").key is None for m in _layers(runtime)) and len(packs) == 3
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(runtime(x), model(x))
    assert len(packs) == 6


def test_copies_and_pickles_of_a_runtime_model_work(exported) -> None:
    """oneDNN's packed weight is an opaque tensor that cannot be copied or pickled: it stays behind."""
    out, model = exported
    runtime = qat.load_quantized(out, Net())
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        y = runtime(x)
        clone = copy.deepcopy(runtime)
        buf = io.BytesIO()
        torch.save(runtime, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(clone(x), y) and torch.equal(loaded(x), y)
