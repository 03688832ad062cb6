"""The quantized layers' Function (``qat.quant.layer_function``) against the two-step graph it replaces
(the quantizers' fused fake quant, then the float op, differentiated by autograd): the same output and the
same gradients of the input, the weight, the bias and every learned scale and offset, bit for bit; what it
keeps for the backward pass (codes and masks, no float copy); and bf16 models (a cast model, autocast)."""

from __future__ import annotations

import pytest
import torch
from helpers.probes import saved_by_autograd
from helpers.quantizers import randn
from torch import nn

from qat.config import QuantSpec
from qat.quant import layer_function
from qat.quant import modules as qm

LSQ_G = QuantSpec(format="int4", granularity="per_group", group_size=8, scale="lsq")
LSQ_C = QuantSpec(format="int3", granularity="per_channel", scale="lsq")
MINMAX_C = QuantSpec(format="int8", granularity="per_channel")
DYN_TOKEN = QuantSpec(format="int8", granularity="per_token", dynamic=True, symmetric=False)
LSQ_PLUS = QuantSpec(format="int4", scale="lsq", symmetric=False)
STATIC = QuantSpec(format="uint8", symmetric=False)
PACT = QuantSpec(format="uint4", scale="pact")  # not the affine fake quant: passed as a tensor
FP8 = QuantSpec(format="fp8_e4m3", scale="lsq")
# (weight spec, input spec): the schemes people train, one side float, a source the Function cannot defer.
PAIRS = {
    "w4g_lsq+a8_dyn": (LSQ_G, DYN_TOKEN),
    "w3c_lsq+a4_lsq+": (LSQ_C, LSQ_PLUS),
    "w8c_minmax+a8_static": (MINMAX_C, STATIC),
    "w4g_lsq+float": (LSQ_G, None),
    "float+a4_lsq+": (None, LSQ_PLUS),
    "w4g_lsq+a4_pact": (LSQ_G, PACT),
    "w8_fp8_lsq+a8_dyn": (FP8, DYN_TOKEN),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def two_step(op, params, x, w, bias):
    """The reference: the operands' values (autograd through each quantizer), then the op."""
    return layer_function.OPS[op][0](x.value(), w.value(), bias, params)


def _layer(kind: str, wspec, aspec, bias: bool) -> nn.Module:
    if kind == "linear":
        return qm.QuantLinear.from_float(nn.Linear(16, 12, bias=bias), wspec, aspec, "l")
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=(1, 2), bias=bias)
    if wspec is not None and wspec.granularity == "per_group":
        wspec = QuantSpec(**{**wspec.__dict__, "group_size": 4})  # 4 * 3 * 3 inputs per output
    return qm.QuantConv2d.from_float(conv, wspec, aspec, "c")


def _input(kind: str, rank: int) -> torch.Tensor:
    if kind == "conv":
        return randn(1, 2, 4, 5, 6) * 2
    return randn(1, *((3, 5, 16) if rank == 3 else (7, 16))) * 2


def _step(layer: nn.Module, x: torch.Tensor, dtype=None):
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        y = layer(xg)
    y.backward(randn(2, *y.shape).to(y.dtype))
    return [("value", y), ("x", xg.grad), *((n, p.grad) for n, p in layer.named_parameters())]


def _compare(kind: str, pair: str, bias: bool, rank: int, monkeypatch, dtype=None) -> None:
    layer = _layer(kind, *{**PAIRS, **CONV_PAIRS}[pair], bias).train()
    x = _input(kind, rank)
    layer(x)  # learned scales get their first value
    fused = _step(layer, x, dtype)
    monkeypatch.setattr(qm, "layer_op", two_step)
    ref = _step(layer, x, dtype)
    assert [n for n, _ in fused] == [n for n, _ in ref]
    assert sum(t is not None for _, t in fused) >= 3  # value, x and weight at least
    for (name, a), (_, b) in zip(fused, ref, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
            if a.dtype == torch.float32:
                assert torch.equal(bits(a)[b != 0], bits(b)[b != 0]), name


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [2, 3])
def test_linear_equals_the_two_step_graph(pair, bias, rank, monkeypatch) -> None:
    _compare("linear", pair, bias, rank, monkeypatch)


# Convolutions: per-tensor inputs (a dynamic per-token scale has no meaning for an image).
CONV_PAIRS = {
    "w4g_lsq+a8_dyn_tensor": (LSQ_G, QuantSpec(format="int8", dynamic=True, symmetric=False)),
    **{k: PAIRS[k] for k in ("w3c_lsq+a4_lsq+", "w8c_minmax+a8_static", "float+a4_lsq+")},
}


@pytest.mark.parametrize("pair", CONV_PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_equals_the_two_step_graph(pair, bias, monkeypatch) -> None:
    _compare("conv", pair, bias, 4, monkeypatch)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("pair", ["w4g_lsq+a8_dyn", "w3c_lsq+a4_lsq+"])
def test_under_bf16_autocast_equals_the_two_step_graph(kind, pair, monkeypatch) -> None:
    """The op runs in bf16 (autocast casts its operands), its backward too, the gradients go back to
    float32 as through autocast's casts."""
    pair = "w4g_lsq+a8_dyn_tensor" if kind == "conv" and pair == "w4g_lsq+a8_dyn" else pair
    _compare(kind, pair, True, 3, monkeypatch, dtype=torch.bfloat16)


@pytest.mark.parametrize(("pair", "kept"), [("w4g_lsq+a8_dyn", ["bool", "int8"]), ("w3c_lsq+a4_lsq+", [])])
def test_keeps_codes_and_masks_not_float_operands(pair, kept) -> None:
    """For the backward pass the layer keeps one byte of code and one of mask per value of a fixed-scale
    operand (the dynamic input), the scales, and of an operand with a learned scale only the tensor it
    quantizes (the weight itself, the input): never a float copy of either operand."""
    layer = _layer("linear", *PAIRS[pair], True).train()
    x = randn(1, 64, 16).requires_grad_()
    layer(x)
    saved = saved_by_autograd(lambda: layer(x))
    big = [t for t in saved if t.numel() in (x.numel(), layer.weight.numel())]
    floats = [t for t in big if t.is_floating_point()]
    assert all(t.untyped_storage().data_ptr() in (x.data_ptr(), layer.weight.data_ptr()) for t in floats)
    assert sorted(str(t.dtype).removeprefix("torch.") for t in big if not t.is_floating_point()) == kept


@pytest.mark.parametrize(("kind", "pair"), [("linear", "w4g_lsq+a8_dyn"), ("conv", "w3c_lsq+a4_lsq+")])
def test_compiles_fullgraph_to_the_eager_step(kind, pair) -> None:
    """No graph break in a quantized layer's training step, and the traced forward + backward
    (``aot_eager``) gives the eager values and gradients."""
    layer = _layer(kind, *PAIRS[pair], True).train()
    x = _input(kind, 3)
    layer(x)
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(layer)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        eager = _step(layer, x)
        compiled = _step(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    finally:
        torch._dynamo.reset()
    for (name, a), (_, b) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
