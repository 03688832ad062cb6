"""Quantized layers: same Parameter objects as the float layer, float forward on fake-quantized tensors."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantSpec
from qat.quant import modules as qm
from qat.quant.modules import (
    QUANT_MODULES,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    is_quant_module,
    register_quant_module,
)
from qat.quant.quantizer import FakeQuantizer

W8 = QuantSpec(format="int8", granularity="per_channel")
W4G = QuantSpec(format="int4", granularity="per_group", group_size=4, scale="lsq")
A8 = QuantSpec(format="uint8", symmetric=False)
A8DYN = QuantSpec(format="int8", granularity="per_token", dynamic=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def registry():
    """Restore the global layer registry after a test that registers a type."""
    saved = dict(QUANT_MODULES)
    yield QUANT_MODULES
    QUANT_MODULES.clear()
    QUANT_MODULES.update(saved)


def _float_layers():
    return [
        (nn.Linear(8, 6), QuantLinear, lambda: torch.randn(3, 5, 8)),
        (nn.Linear(8, 6, bias=False), QuantLinear, lambda: torch.randn(4, 8)),
        (
            nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
            QuantConv1d,
            lambda: torch.randn(2, 4, 9),
        ),
        (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), QuantConv2d, lambda: torch.randn(2, 4, 5, 5)),
        (
            nn.Conv2d(4, 4, (1, 3), stride=(2, 1), groups=4, bias=False, dilation=(1, 2)),
            QuantConv2d,
            lambda: torch.randn(2, 4, 6, 7),
        ),
        (nn.Conv2d(2, 4, 3, padding="same"), QuantConv2d, lambda: torch.randn(1, 2, 5, 5)),
    ]


@pytest.mark.parametrize("idx", range(6))
def test_from_float_keeps_parameter_objects_and_forward(idx: int) -> None:
    mod, qtype, make_x = _float_layers()[idx]
    mod.eval()
    params = dict(mod.named_parameters())
    q = qtype.from_float(mod, W8, A8, name="layer")
    assert type(q) is qtype and isinstance(q, type(mod))
    assert dict(q.named_parameters(recurse=False)).keys() == params.keys()
    for name, p in params.items():
        assert getattr(q, name) is p
    assert all(t.device.type == "cpu" for t in q.state_dict().values())  # nothing left on "meta"
    assert not q.training
    assert isinstance(q.weight_quant, FakeQuantizer) and isinstance(q.input_quant, FakeQuantizer)
    assert q.weight_quant.layer_name == "layer" and q.weight_quant.role == "weight"

    x = make_x()
    q.input_quant.train()
    q.input_quant(x)  # observe once so the activation scale is data-driven
    q.input_quant.eval()
    y = q(x)
    xq = q.input_quant(x)
    wq = q.weight_quant(mod.weight)
    if isinstance(mod, nn.Linear):
        ref = F.linear(xq, wq, mod.bias)
    else:
        ref = mod._conv_forward(xq, wq, mod.bias)
    assert torch.equal(y, ref)
    assert not torch.equal(wq, mod.weight)  # the weight really is quantized


def test_activation_channels_and_axis() -> None:
    lin = QuantLinear.from_float(nn.Linear(8, 6), W8, QuantSpec(format="int8", granularity="per_channel"))
    assert lin.input_quant.stat_shape == (8,) and lin.input_quant.act_axis == -1
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), W8, QuantSpec(format="int8", granularity="per_channel"))
    assert conv.input_quant.stat_shape == (3,) and conv.input_quant.act_axis == 1
    conv.train()
    x = torch.randn(2, 3, 5, 5)
    conv(x)
    assert torch.allclose(conv.input_quant.scale, x.abs().amax(dim=(0, 2, 3)) / 127)
    c1 = QuantConv1d.from_float(nn.Conv1d(3, 4, 3), W8, None)
    assert c1.input_quant is None and c1.weight_quant.stat_shape == (4,)


def test_none_specs_keep_sides_in_float() -> None:
    lin = nn.Linear(8, 6)
    q = QuantLinear.from_float(lin, None, A8DYN)
    assert q.weight_quant is None
    x = torch.randn(2, 8)
    assert torch.equal(q(x), F.linear(q.input_quant(x), lin.weight, lin.bias))
    q2 = QuantLinear.from_float(nn.Linear(8, 6), W4G, None)
    assert q2.input_quant is None
    assert torch.equal(q2(x), F.linear(x, q2.weight_quant(q2.weight), q2.bias))


def test_quantized_weight_helper() -> None:
    q = QuantLinear.from_float(nn.Linear(8, 6), W8, None)
    assert torch.equal(q.quantized_weight(), q.weight_quant(q.weight))
    q.weight_quant = None
    assert q.quantized_weight() is q.weight


def test_gradients_reach_the_shared_parameters() -> None:
    lin = nn.Linear(8, 6)
    q = QuantLinear.from_float(lin, W4G, A8DYN)
    q(torch.randn(3, 8)).sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    assert q.weight_quant.scale.grad is not None


def test_embedding() -> None:
    emb = nn.Embedding(10, 8, padding_idx=0, max_norm=None, scale_grad_by_freq=True)
    q = QuantEmbedding.from_float(emb, QuantSpec(format="int4", granularity="per_channel"), A8, name="embed")
    assert q.input_quant is None  # the input is indices: no activation quantizer, even when one is asked for
    assert q.weight is emb.weight and q.padding_idx == 0 and q.scale_grad_by_freq
    assert q.weight_quant.stat_shape == (10,)
    idx = torch.tensor([[0, 3, 9], [1, 1, 2]])
    assert torch.equal(q(idx), F.embedding(idx, q.weight_quant(emb.weight), padding_idx=0))
    back = q.to_float()
    assert type(back) is nn.Embedding and back.weight is emb.weight and back.padding_idx == 0
    assert back.scale_grad_by_freq


def test_tied_weights_stay_tied() -> None:
    emb = nn.Embedding(12, 8)
    head = nn.Linear(8, 12, bias=False)
    head.weight = emb.weight
    qe = QuantEmbedding.from_float(emb, W8, None)
    qh = QuantLinear.from_float(head, W8, None)
    assert qe.weight is qh.weight is emb.weight
    h = qe(torch.tensor([[1, 2, 3]]))
    qh(h).sum().backward()
    assert emb.weight.grad is not None
    with torch.no_grad():
        qe.weight[0].fill_(0.5)
    assert torch.equal(qh.weight[0], torch.full((8,), 0.5))


@pytest.mark.parametrize("idx", range(6))
def test_to_float_round_trip(idx: int) -> None:
    mod, qtype, make_x = _float_layers()[idx]
    mod.train()
    x = make_x()
    ref = mod(x)
    q = qtype.from_float(mod, W8, A8)
    back = q.to_float()
    assert type(back) is type(mod) and back.training
    for name, p in mod.named_parameters():
        assert getattr(back, name) is p
    assert not hasattr(back, "weight_quant") and not hasattr(back, "input_quant")
    assert torch.equal(back(x), ref)
    assert all(t.device.type == "cpu" for t in back.state_dict().values())


def test_state_dict_holds_parameters_and_quantizer_state() -> None:
    q = QuantLinear.from_float(nn.Linear(8, 6), W8, A8)
    keys = set(q.state_dict())
    assert {
        "weight",
        "bias",
        "weight_quant.scale",
        "input_quant.scale",
        "input_quant.observer.max_val",
    } <= keys


def test_is_quant_module() -> None:
    assert is_quant_module(QuantLinear.from_float(nn.Linear(2, 2), W8, None))
    assert not is_quant_module(nn.Linear(2, 2))
    assert not is_quant_module(FakeQuantizer(W8, "weight", (2, 2)))


class Scale(nn.Module):
    """A user layer with a weight: y = x * weight."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class QuantScale(Scale):
    @classmethod
    def from_float(cls, mod, weight_spec, act_spec, name=""):
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.weight = mod.weight
        q.weight_quant = (
            None if weight_spec is None else FakeQuantizer(weight_spec, "weight", mod.weight.shape)
        )
        q.input_quant = None if act_spec is None else FakeQuantizer(act_spec, "activation", name=name)
        return q

    def to_float(self):
        m = Scale.__new__(Scale)
        nn.Module.__init__(m)
        m.weight = self.weight
        return m

    def forward(self, x):
        if self.input_quant is not None:
            x = self.input_quant(x)
        return x * (self.weight if self.weight_quant is None else self.weight_quant(self.weight))


def test_register_quant_module(registry) -> None:
    register_quant_module(Scale, QuantScale)
    assert registry[Scale] is QuantScale
    q = QuantScale.from_float(Scale(4), W8, None)
    assert is_quant_module(q)


def test_register_quant_module_needs_from_float(registry) -> None:
    class NoFromFloat(nn.Module):
        pass

    with pytest.raises(
        TypeError, match=r"NoFromFloat needs a classmethod from_float\(mod, weight_spec, act_spec"
    ):
        register_quant_module(Scale, NoFromFloat)
    assert Scale not in registry


def test_registry_is_exact_types() -> None:
    assert QUANT_MODULES[nn.Linear] is QuantLinear and QUANT_MODULES[nn.Embedding] is QuantEmbedding
    assert qm.NO_INPUT_QUANT == (QuantEmbedding,)


def test_lazy_entries_resolve_once_their_module_is_imported(monkeypatch) -> None:
    """The registry of an optional package's layer types (``import qat`` must not import the package)."""
    pkg = types.ModuleType("optional_pkg_layers")

    class Layer(nn.Linear):
        pass

    class Mine(nn.Linear):
        pass

    pkg.Layer = Layer
    lazy = {"optional_pkg_layers.Layer": "qat.quant.modules.QuantLinear"}
    registry: dict = {}
    assert qm.resolve_lazy(registry, lazy) == {}  # the package is not imported: nothing resolves
    monkeypatch.setitem(sys.modules, "optional_pkg_layers", pkg)
    assert qm.resolve_lazy(registry, lazy) == {Layer: QuantLinear}
    assert qm.resolve_lazy({Layer: Mine}, lazy) == {Layer: Mine}  # an entry the user registered is kept
    assert "transformers.pytorch_utils.Conv1D" in qm.LAZY_QUANT_MODULES


def test_conv_layers_share_one_base() -> None:
    for cls, ftype in ((QuantConv1d, nn.Conv1d), (QuantConv2d, nn.Conv2d)):
        assert issubclass(cls, qm.QuantConv) and issubclass(cls, ftype) and cls.float_type is ftype
        assert "forward" not in vars(cls) and "from_float" not in vars(cls)


def test_deployed_swaps_in_what_layers_deploy_as() -> None:
    class Deploys(nn.Linear):
        def deployable(self) -> nn.Module:
            return nn.Identity()

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(Deploys(2, 2)))
    assert qm.deployed(model) is model
    assert type(model[0]) is nn.Linear and type(model[1][0]) is nn.Identity
