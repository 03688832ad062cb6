"""The export format's codec: a fake quantizer's state <-> the tensors and JSON entries of an export.

The one home of the format facts that the exporter, the integer runtime, the loader, the schema checks and
the ONNX builder share (the layout itself is documented in :mod:`qat.deploy.schema`):

* dtype tables: safetensors dtype names, the dtypes of codes, scales and zero points;
* encoding (:func:`encode_weight`, :func:`encode_act`): codes (packed by :mod:`qat.deploy.packing`, or
  int8 / uint8 / float8), compact scales, zero points and TTQ's negative scale, from the quantizer's state
  as its forward pass uses them;
* decoding (:class:`QWeight`, :func:`act_spec`): entries and tensors back into codes, broadcastable scales
  and specs; granularity shapes come from :class:`~qat.quant.granularity.Granularity`;
* the dtype and shape the schema checks expect of every tensor an entry names (:func:`entry_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from qat.config import QuantSpec
from qat.deploy.packing import container_bits, pack, packed_numel, unpack_wide
from qat.quant import intgemm
from qat.quant.granularity import Granularity
from qat.quant.quantizer import FakeQuantizer

# safetensors dtype name -> torch dtype: every dtype an export may hold.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SCALE_DTYPE = torch.float32  # scales, negative scales and SmoothQuant factors


def dtype_name(dtype: torch.dtype) -> str:
    """``"int8"`` for ``torch.int8``: how ``codes.dtype`` names a dtype in ``quant_config.json``."""
    return str(dtype).replace("torch.", "")


# codes.dtype -> the safetensors dtype of the codes tensor (packed codes are uint8 bytes).
CODE_DTYPES = {dtype_name(d): ST_NAMES[d] for d in (torch.int8, torch.uint8, *FP8_TORCH.values())}
# How each kind of format turns codes back into values (written into every entry as "dequant").
DEQUANT = {
    "int": "(q - zero_point) * scale",
    "binary": "q * scale, q in {-1, +1}",
    "ternary": "q * scale for q = +1, q * scale_neg (or scale) for q = -1, 0 for q = 0",
    "fp8": "float(q) * scale",
}
KINDS = tuple(DEQUANT)
# The stored code of a binary / ternary value is ``q - offset`` in this many bits (int: the format's bits).
CODE_BITS = {"binary": (1, 0), "ternary": (2, -1)}


class ExportFormatError(ValueError):
    """An export directory cannot be read: missing, truncated or corrupt files, unknown schema, mismatch."""


# ``add(tensor name, tensor, byte class)`` stores a tensor and returns its reference ``{"tensor", "shape"}``.
AddTensor = Callable[[str, torch.Tensor, str], dict[str, Any]]


def zero_point_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def qparam_shape(fq: FakeQuantizer) -> list[int]:
    """Shape a weight's scales (and zero points) are stored in: [1], [out] or [out, groups], i.e. the
    quantizer's statistics shape without the broadcast 1 that per-group statistics carry."""
    shape = [int(s) for s in fq.stat_shape]
    return shape[:2] if fq.spec.granularity == "per_group" else shape


def spec_fields(fq: FakeQuantizer) -> dict[str, Any]:
    """The format fields every weight and activation entry starts with."""
    spec = fq.spec
    keys = ("format", "kind", "bits", "signed", "symmetric", "granularity", "group_size")
    e = {k: getattr(spec, k) for k in keys}
    e["bits"] = int(spec.bits) if float(spec.bits).is_integer() else spec.bits
    return {**e, "scale_source": spec.scale, "qmin": int(fq.qmin), "qmax": int(fq.qmax)}


def act_spec(entry: Mapping[str, Any], key: str) -> QuantSpec:
    """The :class:`QuantSpec` an activation entry describes (``key``: where it is, for errors)."""
    return QuantSpec(
        format=entry["format"],
        granularity=entry["granularity"],
        group_size=entry.get("group_size"),
        symmetric=bool(entry["symmetric"]),
        scale=entry["scale_source"],
        dynamic=bool(entry["dynamic"]),
        _key=key,
    )


# ----------------------------------------------------------------------------------------------- encoding
def _encode_codes(
    name: str, fq: FakeQuantizer, codes: torch.Tensor, shape: list[int], add: AddTensor
) -> dict:
    spec = fq.spec
    meta: dict[str, Any] = {"count": math.prod(shape), "order": "C, least significant bits first"}
    if spec.kind == "fp8":
        t, packed, cbits, offset = codes.reshape(shape).to(FP8_TORCH[spec.format]), False, 8, 0
    else:
        # (codes of unsigned 8-bit formats come wrapped in int8)
        q = codes.to(torch.int16) if spec.signed else codes.to(torch.uint8).to(torch.int16)
        bits, offset = CODE_BITS.get(spec.kind, (int(spec.bits), int(fq.qmin)))
        if spec.kind == "binary":
            q = (q > 0).to(torch.int16)  # bit 1 for +1, bit 0 for -1
        cbits = container_bits(bits)
        packed = cbits < 8
        t = pack(q, bits, offset) if packed else q.reshape(shape).to(zero_point_dtype(spec.signed))
        offset = offset if packed else 0
    meta["tensor"] = add(name, t, "codes")["tensor"]
    meta.update(dtype=dtype_name(t.dtype), container_bits=cbits, packed=packed, offset=offset)
    return meta


def encode_weight(name: str, fq: FakeQuantizer, w: torch.Tensor, add: AddTensor) -> tuple[dict, torch.Tensor]:
    """Store the weight ``w`` of layer ``name`` as ``fq`` quantizes it (eval mode); returns its entry and
    the fake-quant weight the stored tensors must reproduce. Runs ``fq`` once first, which initialises a
    never-run learned scale exactly as training would."""
    spec = fq.spec
    with torch.no_grad():
        ref = fq(w)
        codes, s, z = fq.quantize(w)
    shape = [int(d) for d in w.shape]
    compact = qparam_shape(fq)
    base = f"{name}.weight"
    e = spec_fields(fq)
    e.update(
        shape=shape,
        axis=int(spec.axis) if spec.granularity == "per_channel" else 0,
        dequant=DEQUANT[spec.kind],
    )
    e["codes"] = _encode_codes(f"{base}.codes", fq, codes, shape, add)
    e["scale"] = add(f"{base}.scale", s.reshape(compact).to(SCALE_DTYPE), "qparams")
    e["zero_point"] = e["scale_neg"] = None
    if spec.kind == "int" and not spec.symmetric:
        zp = z.reshape(compact).round().to(zero_point_dtype(spec.signed))
        e["zero_point"] = add(f"{base}.zero_point", zp, "qparams")
    # TTQ: the negative scale exactly as the forward pass on ``w`` uses it (LSQ's gradient scale rounds)
    scale_neg = None if fq.scale_neg is None else fq.learned_scale(w, fq.scale_neg).detach()
    if scale_neg is not None:
        e["scale_neg"] = add(f"{base}.scale_neg", scale_neg.reshape(compact).to(SCALE_DTYPE), "qparams")
    return e, ref


def encode_act(name: str, fq: FakeQuantizer, add: AddTensor) -> dict[str, Any]:
    """The input entry of layer ``name`` (a standalone quantizer: its own entry): the format, and for
    static formats the scale / zero point / negative scale the quantizer holds (none for closed-form
    scales, which are computed from each tensor)."""
    spec = fq.spec
    e = spec_fields(fq)
    e.update(dynamic=spec.dynamic, channel_axis=int(fq.act_axis), dequant=DEQUANT[spec.kind])
    e["scale"] = e["zero_point"] = e["scale_neg"] = None
    if spec.dynamic:
        return e
    base, compact = f"{name}.input", list(fq.stat_shape)
    s, z, scale_neg = fq.effective_qparams()
    if s is not None:
        e["scale"] = add(f"{base}.scale", s.reshape(compact).to(SCALE_DTYPE), "qparams")
    if z is not None and spec.kind == "int" and not spec.symmetric:
        zp = z.reshape(compact).round().to(zero_point_dtype(spec.signed))
        e["zero_point"] = add(f"{base}.zero_point", zp, "qparams")
    if scale_neg is not None:
        e["scale_neg"] = add(f"{base}.scale_neg", scale_neg.reshape(compact).to(SCALE_DTYPE), "qparams")
    return e


def entry_tensors(e: Mapping[str, Any], weight: bool) -> Iterator[tuple[str, str, list[int]]]:
    """``(tensor, safetensors dtype, shape)`` of every tensor a weight or input entry names."""
    if weight:
        c = e["codes"]
        shape = [packed_numel(c["count"], c["container_bits"])] if c["packed"] else list(e["shape"])
        yield c["tensor"], CODE_DTYPES[c["dtype"]], shape
    scale, zp = ST_NAMES[SCALE_DTYPE], ST_NAMES[zero_point_dtype(e["signed"])]
    for key, dtype in (("scale", scale), ("zero_point", zp), ("scale_neg", scale), ("smooth", scale)):
        ref = e.get(key)
        if ref is not None:
            yield ref["tensor"], dtype, list(ref["shape"])


# ----------------------------------------------------------------------------------------------- decoding
class QWeight:
    """A decoded quantized weight: integer codes (or fp8 values) plus broadcastable scale / zero point.

    Raises :class:`ExportFormatError` for codes that do not match the entry."""

    def __init__(self, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> None:
        self.entry = entry
        self.kind: str = entry["kind"]
        self.shape = [int(s) for s in entry["shape"]]
        self.granularity = Granularity(
            entry["granularity"], int(entry.get("axis", 0)), int(entry.get("group_size") or 0)
        )
        c = entry["codes"]
        raw = tensors[c["tensor"]]
        count = int(c["count"])
        if count != math.prod(self.shape):
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
        bshape = self.granularity.bcast_shape(self.shape)
        self.scale = tensors[entry["scale"]["tensor"]].float().reshape(bshape)
        self.zero_point, self.scale_neg = (
            None if entry.get(key) is None else tensors[entry[key]["tensor"]].float().reshape(bshape)
            for key in ("zero_point", "scale_neg")
        )

    def dequantize(self) -> torch.Tensor:
        """The fake-quant weight, bit for bit: same operations in the same order as the training forward."""
        q = self.granularity.view(self.q.float())
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
        g = self.granularity
        if not intgemm.weight_int_ok(self.kind, g.kind, g.axis, len(self.shape), self.scale_neg is not None):
            return None
        return intgemm.int_weight(
            self.q.reshape(self.shape[0], -1), self.scale, self.zero_point, self.entry["qmax"]
        )
