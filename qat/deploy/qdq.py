"""The ONNX target's layer modules (:mod:`qat.deploy.onnx` traces an export rebuilt with them).

Layers on the integer path of the runtime (:func:`qat.quant.intgemm.weight_int_ok` /
:func:`~qat.quant.intgemm.act_int_ok`, and for convolutions :func:`qat.quant.modules.conv_int_ok`) become
standard ONNX integer ops that compute what :mod:`qat.quant.intgemm` computes, bit for bit:

* activation codes ``q = clamp(round_half_even(x * (1/s)) + z)``, sent as uint8 (signed grids shifted by
  128, zero point with them): static and dynamic per-tensor scales as ``Mul(x, 1/s)`` ->
  ``QuantizeLinear(scale 1, zero point)`` (-> ``Clip`` for grids under 8 bits; ``QuantizeLinear`` divides
  by its scale, which is not the fake quant's multiply by ``1/s``, hence scale 1); dynamic per-token
  scales as ``Round``/``Add``/``Clip``/``Cast`` (per-row zero points go into a correction term);
* ``MatMulInteger`` / ``ConvInteger`` on the int8 weight codes (their zero points as the op's): the exact
  int32 sum ``(q_x - z_x)(q_w - z_w)``;
* one rescale, ``Cast`` -> ``Mul(s_x * s_w)`` -> ``Add(bias)``: two float32 roundings, as in intgemm.

onnxruntime runs these as its integer GEMM kernels (weights prepacked at load) in any session, with no
option to set. Other layers keep the QDQ form: integer weights behind ``DequantizeLinear``, activations
through ``QuantizeLinear`` -> (``Clip``) -> ``DequantizeLinear``, and what has no QDQ form stays plain
arithmetic. The custom torch ops below compute what their ONNX nodes compute and translate to them
(:func:`translation_table`), so a module here run in torch is the graph's own emulation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.deploy.codec import QWeight
from qat.deploy.runtime import RuntimeActQuant, StoredLayer, conv_forward, embedding_forward, keep_attributes
from qat.quant.intgemm import IntWeight
from qat.quant.modules import conv_int_ok


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


@torch.library.custom_op("qat_export::quantize_u8", mutates_args=())
def _quantize_u8(y: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear with scale 1 (``round_half_even(y) + zero_point``, saturated to uint8), then Clip
    to ``[qmin, qmax]``: uint8 codes of the already scaled ``y``."""
    return torch.clamp(torch.round(y) + zero_point.float(), qmin, qmax).to(torch.uint8)


@_quantize_u8.register_fake
def _(y, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    return torch.empty(y.shape, dtype=torch.uint8, device=y.device)


def _centered(t: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``t - zero_point`` in float64 (exact for 8-bit codes and their int32 sums)."""
    return t.double() if zero_point is None else t.double() - zero_point.double()


@torch.library.custom_op("qat_export::matmul_integer", mutates_args=())
def _matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero_point: torch.Tensor | None,
                    b_zero_point: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """ONNX MatMulInteger: ``(a - a_zero_point) @ (b - b_zero_point)`` in int32 (per-column ``b`` zero
    points)."""
    return (_centered(a, a_zero_point) @ _centered(b, b_zero_point)).to(torch.int32)


@_matmul_integer.register_fake
def _(a, b, a_zero_point, b_zero_point):  # type: ignore[no-untyped-def]
    return torch.empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32, device=a.device)


@torch.library.custom_op("qat_export::conv_integer", mutates_args=())
def _conv_integer(x: torch.Tensor, w: torch.Tensor, x_zero_point: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int]) -> torch.Tensor:  # fmt: skip
    """ONNX ConvInteger (weight zero point 0: onnxruntime takes no per-channel one): the convolution of
    ``x - x_zero_point`` (zero padded: the padding is the zero point's code) with ``w``, in int32."""
    op = F.conv1d if w.dim() == 3 else F.conv2d
    return op(_centered(x, x_zero_point), w.double(), None, stride, padding, dilation).to(torch.int32)


@_conv_integer.register_fake
def _(x, w, x_zero_point, stride, padding, dilation):  # type: ignore[no-untyped-def]
    y = torch.empty(x.shape, dtype=torch.float32, device="meta")
    op = F.conv1d if w.dim() == 3 else F.conv2d
    out = op(y, torch.empty(w.shape, device="meta"), None, stride, padding, dilation)
    return torch.empty(out.shape, dtype=torch.int32, device=x.device)


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

    def quantize_u8(y, zero_point, qmin: int, qmax: int):  # type: ignore[no-untyped-def]
        q = op.QuantizeLinear(y, op.CastLike(1.0, y), zero_point)
        if (qmin, qmax) != (0, 255):
            q = op.Clip(q, op.CastLike(qmin, zero_point), op.CastLike(qmax, zero_point))
        return q

    def matmul_integer(a, b, a_zero_point, b_zero_point):  # type: ignore[no-untyped-def]
        return op.MatMulInteger(a, b, a_zero_point, b_zero_point)

    def conv_integer(x, w, x_zero_point, stride, padding, dilation):  # type: ignore[no-untyped-def]
        pads = [*padding, *padding]
        return op.ConvInteger(x, w, x_zero_point, strides=stride, pads=pads, dilations=dilation)

    return {
        torch.ops.qat_export.dequantize.default: dequantize,
        torch.ops.qat_export.quantize_dequantize.default: quantize_dequantize,
        torch.ops.qat_export.quantize_u8.default: quantize_u8,
        torch.ops.qat_export.matmul_integer.default: matmul_integer,
        torch.ops.qat_export.conv_integer.default: conv_integer,
    }


# ----------------------------------------------------------------------------------------------- modules
def _int4(qw: QWeight) -> tuple[bool, bool]:
    """Whether the codes fit an ONNX ``INT4`` / ``UINT4`` initializer, and whether signed."""
    e = qw.entry
    int4 = (qw.kind != "int" or int(e["bits"]) <= 4) and e["qmin"] >= -8 and e["qmax"] <= 15
    return int4, bool(e["signed"]) or qw.kind != "int"


class QdqWeight(nn.Module):
    """Integer codes + scale (+ zero point) that trace to one ``DequantizeLinear`` on an int initializer."""

    def __init__(self, qw: QWeight) -> None:
        super().__init__()
        self.shape = qw.shape
        self.float_fallback = qw.kind not in ("int", "binary", "ternary") or qw.scale_neg is not None
        if self.float_fallback:  # fp8 / TTQ: dequantised float initializer
            self.register_buffer("weight", qw.dequantize())
            return
        self.int4, self.signed = _int4(qw)
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


class QdqIntGemm(nn.Module):
    """A linear layer or convolution on the integer path, as ONNX integer ops (see the module docstring):
    the weight's int8 codes ``[K, N]`` (convolutions: ``[N, C, *kernel]``) and zero points, the input's
    quantizer (dynamic scales are computed in the graph by the quantizer's own ops), one rescale.
    ``conv``: the float convolution (None for a linear layer); ``int4``: :func:`_int4` of the weight."""

    def __init__(self, act: RuntimeActQuant, w: IntWeight, bias: torch.Tensor | None, conv: Any,
                 int4: tuple[bool, bool]) -> None:  # fmt: skip
        super().__init__()
        fq = act.fq
        self.int4, self.signed = int4  # codes that fit an INT4 / UINT4 initializer (written by the exporter)
        self.act = act
        self.off = 128 if fq.qmin < 0 else 0  # codes travel as uint8
        self.qmin, self.qmax = int(fq.qmin) + self.off, int(fq.qmax) + self.off
        self.dynamic, self.per_row = fq.spec.dynamic, fq.spec.granularity == "per_token"
        n, k = w.w_int.shape  # [N, K], K in (C, *kernel) order for convolutions
        self.conv = None if conv is None else (list(conv.stride), list(conv.padding), list(conv.dilation))
        self.out_shape = (-1,) if conv is None else (-1, *([1] * len(conv.kernel_size)))
        codes = w.w_int.t() if conv is None else w.w_int.reshape(n, conv.in_channels, *conv.kernel_size)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("w_zero_point", None if w.w_zero is None else (-w.w_zero).to(torch.int8))
        if conv is not None and w.w_zero is not None:  # w - z_w = codes + w_zero: + window sums * w_zero
            self.register_buffer("window", torch.ones(1, *codes.shape[1:], dtype=torch.int8))
            self.register_buffer("w_zero", w.w_zero.reshape(self.out_shape))
        self.register_buffer("w_scale", w.w_scale)
        self.register_buffer("bias", None if bias is None else bias.reshape(self.out_shape))
        if self.per_row:  # sum over K of (codes - zero point), for the per-row zero point term
            self.register_buffer("col_sum", w.w_sum if w.w_zero is None else w.w_sum + k * w.w_zero)
        if self.dynamic:
            return
        s, z = fq.qparams(torch.zeros(1, 1))
        # the activation's 1/s, its zero point on the wire, and s * s_w: intgemm's own float32 values
        self.register_buffer("recip", torch.reciprocal(s).reshape(()))
        self.register_buffer("zero_point", (z + self.off).reshape(()).to(torch.uint8))
        self.register_buffer("scale", (s.reshape(1) * w.w_scale).reshape(self.out_shape))

    def _integer(self, q: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        if self.conv is None:
            return torch.ops.qat_export.matmul_integer(q, self.codes, zero_point, self.w_zero_point)
        acc = torch.ops.qat_export.conv_integer(q, self.codes, zero_point, *self.conv)
        if self.w_zero_point is None:
            return acc
        return acc + torch.ops.qat_export.conv_integer(q, self.window, zero_point, *self.conv) * self.w_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act.prescale(x)
        if self.per_row:
            y = self._per_row(x)
        else:
            if self.dynamic:
                s, z = self.act.fq.qparams(x)
                recip, zero_point = torch.reciprocal(s).reshape(()), (z + self.off).reshape(())
                zero_point = zero_point.to(torch.uint8)
                scale = (s.reshape(1) * self.w_scale).reshape(self.out_shape)
            else:
                recip, zero_point, scale = self.recip, self.zero_point, self.scale
            q = torch.ops.qat_export.quantize_u8(x * recip, zero_point, self.qmin, self.qmax)
            y = self._integer(q, zero_point).to(torch.float32) * scale
        return y if self.bias is None else y + self.bias

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales: codes by Round/Add/Clip/Cast, the zero points as ``-(z) * col_sum``."""
        s, z = self.act.fq.qparams(x)
        zq = z + self.off
        q = torch.clamp(torch.round(x * torch.reciprocal(s)) + zq, self.qmin, self.qmax).to(torch.uint8)
        acc = self._integer(q, None) + (-zq).to(torch.int32) * self.col_sum
        return acc.to(torch.float32) * s * self.w_scale


def int_gemm_of(layer: StoredLayer, conv: bool) -> QdqIntGemm | None:
    """The integer-op form of a stored linear / conv layer, or None when its formats have no integer GEMM
    (the runtime's rule: :class:`qat.deploy.runtime.IntLinear` / ``IntConv``)."""
    act, qw = layer.act, layer.weight
    if not layer.int_matmul or qw is None or act is None or not act.int_capable:
        return None
    if conv and not conv_int_ok(layer.module, act.fq):
        return None
    w = qw.int_weight()
    if w is None:
        return None
    return QdqIntGemm(act, w, layer.bias, layer.module if conv else None, _int4(qw))


class _QdqLayer(nn.Module):
    """A stored layer as integer ops (:class:`QdqIntGemm`) where its formats allow, else over a
    dequantized weight node (or its float weight) with a QDQ'd input; the float module's attributes
    (kernel size, padding index, ...) say how it computes."""

    GEMM: str | None = None  # "linear" / "conv": a layer that may take the integer path

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        keep_attributes(self, layer.module)
        self.int_gemm = None if self.GEMM is None else int_gemm_of(layer, self.GEMM == "conv")
        if self.int_gemm is not None:
            return
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
    GEMM = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_gemm is not None:
            return self.int_gemm(x)
        return F.linear(self._input(x), self._weight(), self.bias)


class QdqConv(_QdqLayer):
    GEMM = "conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_gemm is not None:
            return self.int_gemm(x)
        return conv_forward(self, self._input(x), self._weight(), self.bias)


class QdqEmbedding(_QdqLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_forward(self, x, self._weight())
