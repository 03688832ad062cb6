"""Reloaded models behave like the float ones: every runtime layer keeps the public attributes of the float
layer it replaces (``in_features``, ``kernel_size``, ``num_embeddings``, ``padding_idx``, ...) and a
``weight`` with its dtype, shape and device, which model code reads in ``forward`` (Whisper's encoder reads
``embed_positions.num_embeddings`` and ``.weight``, ViT its patch projection's ``weight.dtype``). A layer on
the integer path holds no float weight: computing with its ``weight`` raises instead of using wrong values.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.export_models import prepared_export
from torch import nn

import qat
from qat.deploy.runtime import AbsentWeight, DequantLayer, IntConv, IntEmbedding, IntLinear
from qat.quant.modules import QUANT_MODULES
from qat.quant.quantizer import FakeQuantizer

W8A8 = {
    "weight": {"format": "int8", "granularity": "per_channel"},
    "activation": {"format": "int8", "granularity": "per_tensor", "scale": "ema"},
}


class Affine(nn.Module):
    """A layer type the deploy registry does not know (exported as op "generic")."""

    def __init__(self, n: int, gain: float = 2.0) -> None:
        super().__init__()
        self.n, self.gain = n, gain
        self.weight = nn.Parameter(torch.randn(n, n) / n**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * F.linear(x, self.weight)


class QuantAffine(Affine):
    @classmethod
    def from_float(cls, mod: Affine, weight_spec, act_spec, name: str = "") -> QuantAffine:
        q = cls(mod.n, mod.gain)
        q.weight = mod.weight
        q.weight_quant = FakeQuantizer(weight_spec, "weight", tuple(mod.weight.shape), name=name)
        q.input_quant = FakeQuantizer(act_spec, "activation", (mod.n,), name=name)
        return q

    def to_float(self) -> Affine:
        m = Affine(self.n, self.gain)
        m.weight = self.weight
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * F.linear(self.input_quant(x), self.weight_quant(self.weight))


class Net(nn.Module):
    """Reads its layers' attributes in ``forward``, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(6, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(24, 10)
        self.affine = Affine(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv2.weight.dtype)  # ViT
        h = self.conv2(x).flatten(1)
        pos = self.pos(torch.arange(self.pos.num_embeddings, device=self.pos.weight.device))  # Whisper
        s = self.conv1(pos.t().unsqueeze(0)).mean((0, 2)).expand(h.shape[0], -1)
        return self.affine(self.fc(torch.cat([h, s], 1)))


RUNTIME_TYPES = {
    "pos": IntEmbedding,
    "conv1": IntConv,
    "conv2": IntConv,
    "fc": IntLinear,
    "affine": DequantLayer,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(QUANT_MODULES, Affine, QuantAffine)
        torch.manual_seed(0)
        net = Net()
        batches = [(torch.randn(4, 1, 4, 4),) for _ in range(3)]
        out = tmp_path_factory.mktemp("attrs") / "e"
        model, report = prepared_export(net, W8A8, batches, out)
        yield out, model, batches, report


def public_attributes(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


@pytest.mark.parametrize("int_matmul", [True, False], ids=["int_mm", "dequant"])
def test_every_runtime_layer_keeps_the_float_layers_attributes(exported, int_matmul):
    out, model, batches, report = exported
    assert report.verification["passed"]
    float_net = Net()
    runtime = qat.load_quantized(out, Net(), int_matmul=int_matmul)
    for name, kind in RUNTIME_TYPES.items():
        layer, ref = getattr(runtime, name), getattr(float_net, name)
        assert type(layer) is kind, name
        attrs = public_attributes(ref)
        assert attrs and {k: getattr(layer, k) for k in attrs} == attrs, name
        w, fw = layer.weight, ref.weight
        assert (w.dtype, w.shape, w.device) == (fw.dtype, fw.shape, fw.device), name
    int_layers = [runtime.conv1, runtime.conv2, runtime.fc]
    assert [m.uses_int_mm for m in int_layers] == [int_matmul] * 3
    assert all((type(m.weight) is AbsentWeight) is int_matmul for m in int_layers)
    with torch.no_grad():
        for batch in batches:  # the model's forward reads those attributes
            torch.testing.assert_close(runtime(batch[0]), model(batch[0]), rtol=0, atol=1e-5)


def test_an_absent_weight_reports_its_metadata_and_refuses_to_compute(exported):
    out = exported[0]
    runtime = qat.load_quantized(out, Net())
    w = runtime.fc.weight
    assert isinstance(w, torch.Tensor) and type(w) is AbsentWeight and w.shape == (10, 24)
    with pytest.raises(RuntimeError, match="holds no float weight"):
        F.linear(torch.randn(2, 24), w)
    with pytest.raises(RuntimeError, match="holds no float weight"):
        w.sum()
    assert "fc.weight" not in runtime.state_dict()  # nothing stored, nothing to load
    assert type(copy.deepcopy(runtime).fc.weight) is AbsentWeight
    assert runtime.to(torch.float64).fc.weight.dtype == torch.float64  # follows .to() without values
