"""The integer runtime: rebuild an inference model from an export directory (safetensors + JSON only).

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
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantSpec
from qat.deploy import schema
from qat.deploy.packing import unpack_wide
from qat.deploy.schema import ExportFormatError
from qat.quant import intgemm
from qat.quant.modules import conv_int_ok, int_conv, int_linear
from qat.quant.qparams import SCALE_EPS
from qat.quant.quantizer import FakeQuantizer

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# ----------------------------------------------------------------------------------------------- files
def read_safetensors(
    path: Path, expected: Mapping[str, Any] | None, config_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header of a safetensors file, checked against the size/sha256 recorded at export and
    ``config_sha256`` against the config digest the exporter stored in its metadata (when both exist)."""
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing")
    data = path.read_bytes()
    if expected is not None:
        if "bytes" in expected and len(data) != expected["bytes"]:
            raise ExportFormatError(
                f"{path}: {len(data)} bytes but the export wrote {expected['bytes']} (truncated or replaced?)"
            )
        if "sha256" in expected and hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise ExportFormatError(
                f"{path}: sha256 does not match {schema.CONFIG_FILE} (the file is corrupt)"
            )
    if len(data) < 8:
        raise ExportFormatError(f"{path}: truncated ({len(data)} bytes; no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ExportFormatError(f"{path}: truncated (header says {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{path}: corrupt safetensors header: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    stored = meta.get("config_sha256") if isinstance(meta, dict) else None
    if config_sha256 is not None and stored is not None:  # qatkit exports record it; others may not
        if stored != config_sha256:
            raise ExportFormatError(
                f"{path}: does not belong to this {schema.CONFIG_FILE} (config checksum mismatch: one of "
                "the two files was changed or replaced)"
            )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as e:
        raise ExportFormatError(f"{path}: truncated or corrupt safetensors file: {e}") from None
    return tensors, {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


# ----------------------------------------------------------------------------------------------- weights
def _bcast_shape(granularity: str, axis: int, shape: list[int]) -> list[int]:
    """Shape a compact scale takes to broadcast on the weight's view (see ``FakeQuantizer._bcast``)."""
    if granularity == "per_tensor":
        return [1]
    if granularity == "per_channel":
        a = axis % len(shape)
        return [-1 if d == a else 1 for d in range(len(shape))]
    return [shape[0], -1, 1]  # per_group on the [out, K/g, g] view


def _view_shape(entry: Mapping[str, Any]) -> list[int]:
    shape = list(entry["shape"])
    if entry["granularity"] == "per_group":
        return [shape[0], -1, int(entry["group_size"])]
    return shape


class QWeight:
    """A decoded quantized weight: integer codes (or fp8 values) plus broadcastable scale / zero point."""

    def __init__(self, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> None:
        self.entry = entry
        self.kind: str = entry["kind"]
        self.shape = [int(s) for s in entry["shape"]]
        c = entry["codes"]
        raw = tensors[c["tensor"]]
        count = int(c["count"])
        if count != _numel(self.shape):
            raise ExportFormatError(f"{where}: codes.count {count} does not match weight shape {self.shape}")
        if self.kind == "fp8":
            self.q = raw.reshape(self.shape).float()
        elif c["packed"]:
            self.q = unpack_wide(raw, int(c["container_bits"]), count, int(c["offset"])).reshape(self.shape)
            if self.kind == "binary":
                self.q = self.q * 2 - 1  # bit 1 -> +1, bit 0 -> -1
        else:
            self.q = raw.to(torch.int16).reshape(self.shape)
        if self.kind != "fp8":
            lo, hi = int(self.q.min()), int(self.q.max())
            if lo < entry["qmin"] or hi > entry["qmax"]:
                raise ExportFormatError(
                    f"{where}: codes span [{lo}, {hi}], outside the format's "
                    f"[{entry['qmin']}, {entry['qmax']}]"
                )
        bshape = _bcast_shape(entry["granularity"], int(entry.get("axis", 0)), self.shape)
        self.scale = tensors[entry["scale"]["tensor"]].float().reshape(bshape)
        zp = entry.get("zero_point")
        self.zero_point = None if zp is None else tensors[zp["tensor"]].float().reshape(bshape)
        sn = entry.get("scale_neg")
        self.scale_neg = None if sn is None else tensors[sn["tensor"]].float().reshape(bshape)

    def dequantize(self) -> torch.Tensor:
        """The fake-quant weight, bit for bit: same operations in the same order as the training forward."""
        q = self.q.float().reshape(_view_shape(self.entry))
        if self.kind == "int":
            y = (q - self.zero_point) * self.scale if self.zero_point is not None else q * self.scale
        elif self.scale_neg is not None:  # TTQ
            y = torch.where(q > 0, q * self.scale, q * self.scale_neg)
        else:
            y = q * self.scale
        return y.reshape(self.shape)

    def int_weight(self) -> intgemm.IntWeight | None:
        """The integer GEMM operand, or None when the format has no integer GEMM (scales varying along K,
        TTQ's two scales, fp8): the same rule as the quantized layers' eval path."""
        e = self.entry
        ok = intgemm.weight_int_ok(
            self.kind, e["granularity"], int(e.get("axis", 0)), len(self.shape), self.scale_neg is not None
        )
        if not ok:
            return None
        return intgemm.int_weight(self.q.reshape(self.shape[0], -1), self.scale, self.zero_point, e["qmax"])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ----------------------------------------------------------------------------------------------- activations
class RuntimeActQuant(nn.Module):
    """An activation quantizer rebuilt from an export entry: fake-quant values or integer codes."""

    def __init__(self, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], name: str = "") -> None:
        super().__init__()
        self.entry = dict(entry)
        spec = QuantSpec(
            format=entry["format"],
            granularity=entry["granularity"],
            group_size=entry.get("group_size"),
            symmetric=bool(entry["symmetric"]),
            scale=entry["scale_source"],
            dynamic=bool(entry["dynamic"]),
            _key=f"{name}.input",
        )
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
        self.fq._sync_flags()
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


# ----------------------------------------------------------------------------------------------- layers
class _IntMatmul(nn.Module):
    """Integer GEMM state as buffers (so ``.to(device)`` moves it): int8 weight ``[K, N]``, its column sums,
    row offsets and scales; the arithmetic is :mod:`qat.quant.intgemm`, shared with the eval path of the
    quantized layers."""

    def _setup_int(self, qw: QWeight | None, act: RuntimeActQuant | None, enabled: bool) -> bool:
        w = qw.int_weight() if (enabled and qw is not None and act is not None and act.int_capable) else None
        if w is None:
            return False
        self._set_int_weight(w)
        return True

    def _set_int_weight(self, w: intgemm.IntWeight) -> None:
        for key, t in w._asdict().items():
            self.register_buffer(key, t)

    def _int_weight(self) -> intgemm.IntWeight:
        return intgemm.IntWeight(self.w_int, self.w_sum, self.w_zero, self.w_scale)


def _dequant_param(qw: QWeight | None, float_weight: torch.Tensor | None) -> nn.Parameter:
    w = qw.dequantize() if qw is not None else float_weight
    assert w is not None
    return nn.Parameter(w, requires_grad=False)


class IntLinear(_IntMatmul):
    """Linear layer of the integer runtime (``int_mm`` path when formats allow, else exact dequantisation)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qw: QWeight | None,
        float_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        act: RuntimeActQuant | None,
        int_matmul: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if act is not None and act.smooth is not None and act.smooth.numel() != in_features:
            raise ExportFormatError(
                f"{act.fq.layer_name}: input.smooth has {act.smooth.numel()} values; "
                f"the layer has {in_features} inputs"
            )
        self.act = act
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.uses_int_mm = self._setup_int(qw, act, int_matmul)
        # Only the dequant path needs the float weight; the int path keeps int8 codes alone.
        self.weight = None if self.uses_int_mm else _dequant_param(qw, float_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_int_mm:
            if self.act is not None:
                x = self.act(x)
            return F.linear(x, self.weight, self.bias)
        act = self.act
        return int_linear(act.fq, act.prescale(x), self._int_weight(), self.bias)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int_mm={self.uses_int_mm}"


class IntConv(_IntMatmul):
    """Conv1d/Conv2d of the integer runtime: int8 im2col + ``int_mm`` where formats allow, else dequant."""

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        qw: QWeight | None,
        float_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        act: RuntimeActQuant | None,
        int_matmul: bool = True,
    ) -> None:
        super().__init__()
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.act = act
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        covered = conv_int_ok(conv, None if act is None else act.fq)  # the eval path's rule
        self.uses_int_mm = self._setup_int(qw, act, int_matmul and covered)
        if self.uses_int_mm:  # weight rows (C, kh, kw) -> (kh, kw, C), the order of the im2col columns
            self._set_int_weight(intgemm.conv_weight_im2col_order(self._int_weight(), conv.in_channels))
        self.weight = None if self.uses_int_mm else _dequant_param(qw, float_weight)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_int_mm:
            if self.act is not None:
                x = self.act(x)
            return self._conv(x, self.weight, self.bias)
        return int_conv(self, self.act.fq, x, self._int_weight(), self.bias)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return f"{self.dims}d, out_channels={self.out_channels}, int_mm={self.uses_int_mm}"


class IntEmbedding(nn.Module):
    """Embedding table dequantised once at load (lookups are gathers: no integer kernel to gain from)."""

    def __init__(self, emb: nn.Embedding, qw: QWeight | None, float_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = _dequant_param(qw, float_weight)
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class DequantLayer(nn.Module):
    """Any other registered layer type: the float module with its weight dequantised once, input quantized."""

    def __init__(self, inner: nn.Module, qw: QWeight | None, act: RuntimeActQuant | None) -> None:
        super().__init__()
        if qw is not None:
            inner.weight = _dequant_param(qw, None)
        self.inner = inner
        self.act = act

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.act is not None:
            x = self.act(x)
        return self.inner(x, *args, **kwargs)


def effective_scale(p: torch.Tensor) -> torch.Tensor:
    """A learned scale as the forward pass uses it (positive, at least ``SCALE_EPS``)."""
    return torch.clamp(p.detach().abs(), min=SCALE_EPS)
