"""The ONNX target's layer modules (:mod:`qat.deploy.onnx` traces an export rebuilt with them): integer
weights behind ``DequantizeLinear``, activations through ``QuantizeLinear`` -> (``Clip``) ->
``DequantizeLinear``, as two custom torch ops that compute what those nodes compute and translate to them
(:func:`translation_table`); formats without a QDQ form stay plain arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.deploy.codec import QWeight
from qat.deploy.runtime import RuntimeActQuant, StoredLayer, conv_forward, embedding_forward, keep_attributes


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("qat_export::dequantize", mutates_args=())
def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                block_size: int) -> torch.Tensor:  # fmt: skip
    """ONNX DequantizeLinear: per tensor (scalar scale), per axis (1-D scale) or blocked along ``axis``."""
    if block_size:
        z = zero_point.float().repeat_interleave(block_size, dim=axis)
        return (codes.float() - z) * scale.repeat_interleave(block_size, dim=axis)
    if scale.dim() == 0:
        return (codes.float() - zero_point.float()) * scale
    shape = [-1 if d == axis % codes.dim() else 1 for d in range(codes.dim())]
    return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@_dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size):  # type: ignore[no-untyped-def]
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("qat_export::quantize_dequantize", mutates_args=())
def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                         qmin: int, qmax: int) -> torch.Tensor:  # fmt: skip
    """QuantizeLinear (round half to even of ``x / scale``, + zero point, clip) then DequantizeLinear."""
    if scale.dim() == 0:
        s, z = scale, zero_point.float()
    else:
        shape = [-1 if d == axis % x.dim() else 1 for d in range(x.dim())]
        s, z = scale.reshape(shape), zero_point.float().reshape(shape)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


@_quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


def translation_table() -> dict[Any, Any]:
    """The custom ops as ONNX nodes (opset 21), for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset21 as op

    def dequantize(codes, scale, zero_point, axis: int, block_size: int):  # type: ignore[no-untyped-def]
        if block_size:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def quantize_dequantize(x, scale, zero_point, axis: int, qmin: int, qmax: int):  # type: ignore[no-untyped-def]
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        if (qmin, qmax) != (0, 255):  # sub-8-bit grids: saturate to the format's range
            q = op.Clip(q, op.CastLike(qmin, zero_point), op.CastLike(qmax, zero_point))
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {
        torch.ops.qat_export.dequantize.default: dequantize,
        torch.ops.qat_export.quantize_dequantize.default: quantize_dequantize,
    }


# ----------------------------------------------------------------------------------------------- modules
class QdqWeight(nn.Module):
    """Integer codes + scale (+ zero point) that trace to one ``DequantizeLinear`` on an int initializer."""

    def __init__(self, qw: QWeight) -> None:
        super().__init__()
        e = qw.entry
        self.shape = qw.shape
        self.float_fallback = qw.kind not in ("int", "binary", "ternary") or qw.scale_neg is not None
        if self.float_fallback:  # fp8 / TTQ: dequantised float initializer
            self.register_buffer("weight", qw.dequantize())
            return
        self.int4 = (qw.kind != "int" or int(e["bits"]) <= 4) and e["qmin"] >= -8 and e["qmax"] <= 15
        self.signed = bool(e["signed"]) or qw.kind != "int"
        dt = torch.int8 if self.signed else torch.uint8
        g = qw.granularity
        q = qw.q
        zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale)
        if g.kind == "per_group":  # DequantizeLinear blocks run along axis 1 of the [out, K] matrix
            q = q.reshape(self.shape[0], -1)
            self.axis, self.block = 1, g.group_size
            scale, zp = qw.scale.reshape(self.shape[0], -1), zp.reshape(self.shape[0], -1)
        elif g.kind == "per_channel":
            self.axis, self.block = g.axis % len(self.shape), 0
            scale, zp = qw.scale.reshape(-1), zp.reshape(-1)
        else:
            self.axis, self.block = 0, 0
            scale, zp = qw.scale.reshape(()), zp.reshape(())
        self.register_buffer("codes", q.to(dt))
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", zp.round().to(dt).contiguous())

    def forward(self) -> torch.Tensor:
        if self.float_fallback:
            return self.weight
        w = torch.ops.qat_export.dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block)
        return w.reshape(self.shape)


class QdqAct(nn.Module):
    """Static int activations -> Quantize/DequantizeLinear (uint8); other formats -> the quantizer's ops."""

    def __init__(self, act: RuntimeActQuant) -> None:
        super().__init__()
        self.fq = act.fq
        self.register_buffer("smooth", act.smooth)  # SmoothQuant: a Div node before the QDQ pair
        spec = act.fq.spec
        self.qdq = (
            spec.kind == "int" and not spec.dynamic and spec.granularity in ("per_tensor", "per_channel")
        )
        if not self.qdq:
            return
        s, z = act.fq.qparams(torch.zeros(1, *([1] * max(act.fq.act_axis, 0)), 1))
        self.axis = int(act.fq.act_axis) if spec.granularity == "per_channel" else 0
        # Always uint8 on the wire: signed grids shift by 128 (same values after DequantizeLinear). Signed
        # int8 activations trip onnxruntime's S8->U8 rewrite of QDQ Gemm/MatMul at opset 21.
        shift = 128 if spec.signed else 0
        shape = () if spec.granularity == "per_tensor" else (-1,)
        self.register_buffer("scale", s.detach().float().reshape(shape).contiguous())
        self.register_buffer(
            "zero_point", (z.detach().round() + shift).to(torch.uint8).reshape(shape).contiguous()
        )
        self.qmin, self.qmax = int(act.fq.qmin) + shift, int(act.fq.qmax) + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if not self.qdq:
            return self.fq(x)
        return torch.ops.qat_export.quantize_dequantize(
            x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax
        )


class _QdqLayer(nn.Module):
    """A stored layer over a dequantized weight node (or its float weight), with a QDQ'd input; the
    float module's attributes (kernel size, padding index, ...) say how it computes."""

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        keep_attributes(self, layer.module)
        self.wq = QdqWeight(layer.weight) if layer.weight is not None else None
        if layer.float_weight is not None:
            self.register_buffer("weight", layer.float_weight)
        self.register_buffer("bias", layer.bias)
        self.act = QdqAct(layer.act) if layer.act is not None else None

    def _weight(self) -> torch.Tensor:
        return self.wq() if self.wq is not None else self.weight

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)


class QdqLinear(_QdqLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self._weight(), self.bias)


class QdqConv(_QdqLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, self._input(x), self._weight(), self.bias)


class QdqEmbedding(_QdqLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_forward(self, x, self._weight())
