"""GPT-2's Conv1D as a quantizable layer: same Parameter, transposed weight quantized like nn.Linear."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require
from torch import nn

require("transformers", extra="transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

import qat  # noqa: E402
from qat.config import QuantSpec  # noqa: E402
from qat.hf.models import tiny_model  # noqa: E402
from qat.quant.conv1d import QuantHFConv1D, conv1d_as_linear  # noqa: E402
from qat.quant.modules import QuantLinear  # noqa: E402

SPECS = {
    "per_channel": QuantSpec(format="int4", granularity="per_channel"),
    "per_group": QuantSpec(format="int4", granularity="per_group", group_size=8),
    "per_tensor_lsq": QuantSpec(format="int8", scale="lsq"),
}


def _conv(nf: int = 24, nx: int = 16) -> Conv1D:
    torch.manual_seed(0)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
        conv.weight[:, 3] *= 10.0  # one output feature with a much larger range than the others
    return conv


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_conv1d_quantizes_like_linear_on_the_transposed_weight(spec):
    conv = _conv()
    lin = nn.Linear(16, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    act = QuantSpec(format="int8", granularity="per_token", dynamic=True)
    qc = QuantHFConv1D.from_float(conv, spec, act, name="c")
    ql = QuantLinear.from_float(lin, spec, act, name="l")
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(qc(x), ql(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(qc.linear_weight(), ql.quantized_weight(), rtol=0, atol=0)
    assert qc.quantized_weight().shape == conv.weight.shape  # stored layout [in, out]


def test_per_channel_scales_follow_output_features():
    conv = _conv()
    qc = QuantHFConv1D.from_float(conv, SPECS["per_channel"], None)
    qc(torch.randn(2, 16))
    scale = qc.weight_quant.scale.flatten()
    assert scale.shape == (24,)  # one per output feature (nf), not per input feature (nx)
    assert int(scale.argmax()) == 3  # the enlarged output column gets the largest scale


def test_from_float_reuses_parameters_and_to_float_restores_conv1d():
    conv = _conv()
    qc = QuantHFConv1D.from_float(conv, SPECS["per_group"], None)
    assert qc.weight is conv.weight and qc.bias is conv.bias
    back = qc.to_float()
    assert type(back) is Conv1D and back.weight is conv.weight
    x = torch.randn(4, 16)
    torch.testing.assert_close(back(x), conv(x))


def test_gradients_reach_the_stored_weight():
    qc = QuantHFConv1D.from_float(_conv(), SPECS["per_tensor_lsq"], None)
    qc(torch.randn(4, 16)).square().sum().backward()
    assert qc.weight.grad is not None and qc.weight.grad.shape == (16, 24)
    assert qc.weight_quant.scale.grad is not None


def test_prepare_quantizes_gpt2_conv1d_layers():
    model = tiny_model("gpt2")
    qat.prepare(model, {"weight": {"format": "int8", "granularity": "per_channel"}})
    names = {r.name for r in model.qat_report.quantized}
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantHFConv1D)
    qat.unprepare(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D


def test_conv1d_as_linear_computes_the_same():
    qc = QuantHFConv1D.from_float(_conv(), SPECS["per_group"], None)
    lin = conv1d_as_linear(qc)
    assert isinstance(lin, QuantLinear) and lin.weight_quant is qc.weight_quant
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), qc(x), rtol=0, atol=1e-5)
    plain = conv1d_as_linear(_conv())
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), _conv()(x), rtol=0, atol=1e-5)
