"""The integer runtime: the modules that replace quantized layers when an export is loaded.

Quantized layers compute from the stored integers:

* int weights (any width up to 8 bits, binary, ternary) per tensor or per output channel, with int
  activations per tensor (static or dynamic) or per token (dynamic): a true integer matrix multiply
  (``torch._int_mm``, int8 x int8 -> int32) and one rescale. Convolutions im2col their int8 codes.
  Zero points are folded in with row/column sums, so asymmetric formats stay integer too;
* everything else (per-group or per-input-channel scales, fp8, TTQ, float activations): the weight is
  unpacked and dequantised once at load (cached) and the float op runs on exactly the fake-quant values,
  which makes those layers bit-identical to the fake-quant model.

Activation quantizers are rebuilt as :class:`~qat.quant.quantizer.FakeQuantizer` objects from the
stored spec and scales (observers off), so static, learned and dynamic activation formats compute
exactly as in training, including run-time scales of dynamic formats.

Each runtime module keeps the public attributes of the float module it replaces (``in_features``,
``kernel_size``, ``num_embeddings``, ``padding_idx``, ...) and a ``weight`` with its shape, dtype and
device, so model code that reads them runs unchanged; a layer on the integer path holds only int8 codes,
and its ``weight`` is an :class:`AbsentWeight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.deploy.codec import ExportFormatError, QWeight, act_spec
from qat.quant import intgemm
from qat.quant.modules import conv_int_ok, int_conv, int_linear
from qat.quant.opcache import KeepsOperands, tensors_key
from qat.quant.quantizer import FakeQuantizer


class AbsentWeight(torch.Tensor):
    """The ``weight`` of a layer that computes on integer codes: a tensor with the float weight's shape,
    dtype and device that holds no values. Reading those works (models read ``weight.dtype``); computing
    with it raises, so nothing can silently use it as the weight. ``.to()`` / ``.half()`` / copies keep
    it absent."""

    @staticmethod
    def __new__(cls, shape: Any, dtype: torch.dtype, device: torch.device | str) -> AbsentWeight:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)  # type: ignore[attr-defined]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self, kwargs = args[0], kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            return AbsentWeight(
                self.shape, kwargs.get("dtype") or self.dtype, kwargs.get("device") or self.device
            )
        if func in (
            torch.ops.aten.detach.default,
            torch.ops.aten.clone.default,
            torch.ops.aten.alias.default,
        ):
            return AbsentWeight(self.shape, self.dtype, self.device)
        raise RuntimeError(
            f"{func}: this layer computes on int8 codes and holds no float weight (its weight gives the "
            "float weight's shape, dtype and device only); load_quantized(..., int_matmul=False) keeps one"
        )

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return f"AbsentWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class RuntimeActQuant(nn.Module):
    """An activation quantizer rebuilt from an export entry: fake-quant values or integer codes."""

    def __init__(self, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], name: str = "") -> None:
        super().__init__()
        self.entry = dict(entry)
        spec = act_spec(entry, f"{name}.input")
        ref = entry.get("scale")
        shape = tuple(ref["shape"]) if ref is not None and spec.granularity == "per_channel" else None
        if shape is None and spec.granularity == "per_channel" and not spec.dynamic:
            shape = (1,)
        self.fq = FakeQuantizer(
            spec, "activation", shape, name=name, act_axis=int(entry.get("channel_axis", -1))
        )
        with torch.no_grad():
            for key in ("scale", "zero_point", "scale_neg"):
                ref = entry.get(key)
                target = getattr(self.fq, key)
                if ref is None:
                    continue
                if target is None:
                    raise ExportFormatError(
                        f"{name}: input.{key} is stored but format {spec.describe()} has none"
                    )
                target.copy_(tensors[ref["tensor"]].float().reshape(target.shape))
        self.fq.initialized.fill_(1)
        self.fq.enable_observer(False)
        self.fq.sync_flags()
        self.fq.eval()
        self.int_capable = intgemm.act_int_ok(spec.kind, spec.granularity, spec.dynamic)
        # SmoothQuant factors (schema version 2): the input is divided by them before it is quantized.
        ref = entry.get("smooth")
        self.register_buffer("smooth", None if ref is None else tensors[ref["tensor"]].float().reshape(-1))

    def prescale(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the quantizer sees: ``x / smooth`` for SmoothQuant layers, else ``x``."""
        return x if self.smooth is None else x / self.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(self.prescale(x))


@dataclass
class StoredLayer:
    """One layer of an export, decoded: what each target's builder (:mod:`qat.deploy.registry`) turns into
    the module that replaces the skeleton's ``module``."""

    op: str
    module: nn.Module  # the skeleton's float module at this name (for op "generic": its float state loaded)
    weight: QWeight | None  # the quantized weight, or None
    float_weight: torch.Tensor | None  # the weight, when it is stored in float
    bias: torch.Tensor | None
    act: RuntimeActQuant | None  # the input quantizer (op "activation": the module itself)
    int_matmul: bool = True  # integer GEMMs where the formats allow (False: dequantised weights everywhere)


def keep_attributes(module: nn.Module, float_module: nn.Module) -> None:
    """Give ``module`` the float module's plain attributes (``in_features``, ``kernel_size``,
    ``padding_idx``, ...: everything but parameters, buffers and submodules), which model code may read."""
    for key, value in vars(float_module).items():
        if key != "training" and (not key.startswith("_") or key == "_reversed_padding_repeated_twice"):
            setattr(module, key, value)


def conv_forward(conv: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The float convolution ``conv`` describes (attributes of ``nn.Conv1d`` / ``nn.Conv2d``) with ``w``."""
    op = F.conv1d if len(conv.kernel_size) == 1 else F.conv2d
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return op(x, w, bias, conv.stride, 0, conv.dilation, conv.groups)
    return op(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def embedding_forward(emb: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The lookup ``emb`` describes (attributes of ``nn.Embedding``) in the table ``w``."""
    return F.embedding(x, w, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class _IntMatmul(KeepsOperands, nn.Module):
    """Integer GEMM state as buffers (so ``.to(device)`` moves it): int8 weight ``[N, K]``, its row sums,
    row offsets and scales, packed for the kernel once (:func:`pack_weights`, in its "weight" cache); the
    arithmetic is :mod:`qat.quant.intgemm`, shared with the eval path of the quantized layers. Without an
    integer path: the exactly dequantised (or float-stored) weight."""

    def _setup(self, layer: StoredLayer, int_ok: bool, im2col_channels: int | None = None) -> None:
        keep_attributes(self, layer.module)
        self.act = layer.act
        self.bias = _frozen(layer.bias)
        qw, act = layer.weight, layer.act
        usable = int_ok and layer.int_matmul and qw is not None and act is not None and act.int_capable
        w = qw.int_weight() if usable else None  # type: ignore[union-attr]
        self.uses_int_mm = w is not None
        if w is None:  # the dequant path needs the float weight; the int path keeps int8 codes alone
            self.weight = _frozen(qw.dequantize() if qw is not None else layer.float_weight)
            return
        if im2col_channels is not None:  # conv weight rows (C, kh, kw) -> (kh, kw, C), the im2col order
            w = intgemm.conv_weight_im2col_order(w, im2col_channels)
        for key in ("w_int", "w_sum", "w_zero", "w_scale"):
            self.register_buffer(key, getattr(w, key))
        self.register_buffer(
            "weight", AbsentWeight(qw.shape, w.w_scale.dtype, w.w_scale.device), persistent=False
        )

    def _int_weight(self) -> intgemm.IntWeight:
        """The GEMM operand, with the kernel's packed weight (:func:`qat.quant.intgemm.pack`)."""
        parts = (self.w_int, self.w_sum, self.w_zero, self.w_scale)
        return self.operand_cache("weight").get(
            lambda: tensors_key(parts), lambda: intgemm.pack(intgemm.IntWeight(*parts))
        )


def pack_weights(model: nn.Module) -> None:
    """Pack every integer layer's weight for its kernel, once the model is on its device (the loader's last
    step); ``.to()`` empties the packed copies and the next forward packs again."""
    for m in model.modules():
        if isinstance(m, _IntMatmul) and m.uses_int_mm:
            m._int_weight()


class IntLinear(_IntMatmul):
    """Linear layer of the integer runtime (``int_mm`` path when formats allow, else exact dequantisation)."""

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        act, n = layer.act, layer.module.in_features
        if act is not None and act.smooth is not None and act.smooth.numel() != n:
            raise ExportFormatError(
                f"{act.fq.layer_name}: input.smooth has {act.smooth.numel()} values; the layer has {n} inputs"
            )
        self._setup(layer, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_int_mm:
            if self.act is not None:
                x = self.act(x)
            return F.linear(x, self.weight, self.bias)
        act = self.act
        return int_linear(self, act.fq, act.prescale(x), self._int_weight(), self.bias)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int_mm={self.uses_int_mm}"


class IntConv(_IntMatmul):
    """Conv1d/Conv2d of the integer runtime: int8 im2col + ``int_mm`` where formats allow, else dequant."""

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        act, conv = layer.act, layer.module
        self._setup(
            layer, conv_int_ok(conv, None if act is None else act.fq), conv.in_channels
        )  # eval's rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_int_mm:
            if self.act is not None:
                x = self.act(x)
            return conv_forward(self, x, self.weight, self.bias)
        return int_conv(self, self.act.fq, x, self._int_weight(), self.bias)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return f"{len(self.kernel_size)}d, out_channels={self.out_channels}, int_mm={self.uses_int_mm}"


class IntEmbedding(nn.Module):
    """Embedding table dequantised once at load (lookups are gathers: no integer kernel to gain from)."""

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        keep_attributes(self, layer.module)
        qw = layer.weight
        self.weight = _frozen(qw.dequantize() if qw is not None else layer.float_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_forward(self, x, self.weight)


class DequantLayer(nn.Module):
    """Any other registered layer type: the float module with its weight dequantised once, input quantized.
    Its attributes are the float module's (``inner``)."""

    def __init__(self, layer: StoredLayer) -> None:
        super().__init__()
        inner = layer.module
        if layer.weight is not None:
            inner.weight = _frozen(layer.weight.dequantize())
        self.inner = inner
        self.act = layer.act

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.act is not None:
            x = self.act(x)
        return self.inner(x, *args, **kwargs)
