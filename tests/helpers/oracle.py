"""An independent reference for exported models: each quantized layer computed from the format definition.

Reads an export directory (``quant_config.json`` + ``model.safetensors``) with ``json``, ``struct`` and
``numpy`` only, and computes a quantized layer's output from its input in int64 / float64. It imports
neither torch nor ``qat``, and it was written from the format as documented, not from the runtime:

* the layer entries, tensors, packing and dequant formulas of ``qat/deploy/schema.py`` (docstring) and
  the README ("Export and the integer runtime"): codes ``u = q - offset`` in 1/2/4-bit containers, LSB
  first, C order; binary bit 1 = +1, bit 0 = -1; int ``(q - zero_point) * scale``, binary ``q * scale``,
  ternary ``q * scale`` / ``q * scale_neg`` (TTQ), fp8 ``float(q) * scale``; scales ``[1]`` per tensor,
  ``[C]`` per channel along ``axis``, ``[out, K/g]`` per group of the weight flattened to ``[out, K]``;
  SmoothQuant: the input is divided by ``smooth`` before it is quantized;
* activation quantization, which the schema does not spell out (it says "computed by a rule at run
  time" for dynamic scales): the definition of ``torch.fake_quantize_per_tensor_affine`` the package
  documents itself against, ``q = clamp(round_half_even(x * (1/s)) + z, qmin, qmax)`` evaluated in
  float32 (the activations' dtype); dynamic scales from the min/max of each row (whole tensor, token,
  group or channel): symmetric ``max|x| / qmax`` (``max(x) / qmax`` unsigned), asymmetric
  ``s = (hi - lo) / (qmax - qmin)`` on the range widened to contain 0, ``z = qmin - round(lo / s)``,
  scales clamped to [float32 eps, 2**100]; fp8 dynamic ``max|x| / fmax``; binary activations
  ``sign(x)`` with sign(0) = +1 (docs/methods.md), times the stored scale when there is one;
* FP8 from the OCP definitions of float8_e4m3fn (bias 7, no infinities, max 448) and float8_e5m2 (bias
  15, max 57344): the stored bytes are decoded bit by bit here, and activations are rounded to the
  nearest representable value, ties to even, saturating (README: "round to nearest, saturating").

What the format promises and how a runtime is compared against this reference: layers whose weight has
one scale per output row (int, binary, one-scale ternary; per tensor or per channel on axis 0) and whose
input is int per tensor (static or dynamic) or per token (dynamic) are integer GEMMs: the accumulator
``sum (qa - za)(qw - zw)`` is an exact integer (computed here in int64) and the only float step is one
rescale, so a float32 runtime may differ only by a few roundings of ``|acc * sa * sw| + |bias|``
(``Result.mag``). Other layers are float ops on exactly dequantized values, so float32 summation of
``k`` products bounds the difference by about ``k`` roundings of ``sum |x| |w| + |bias|``
(``Result.mag_sum``). Embedding lookups and standalone activation quantizers are exact: the float32
runtime value must be the float64 value here rounded once to float32.

Not covered (``NotImplementedError``): ternary activations, layers of op "generic" (registered custom
types), grouped or non-zero-padded convolutions.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCALE_EPS = np.float32(2.0**-23)  # float32 machine epsilon: the smallest scale any rule gives
SCALE_MAX = np.float32(2.0**100)

# ------------------------------------------------------------------------------------------ safetensors
# The safetensors layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian data.
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "F8_E4M3": "u1",
              "F8_E5M2": "u1"}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file: floats as float64 (exact), integers as int64."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = np.frombuffer(data[8 + n + start : 8 + n + end], dtype=_NP_DTYPES[meta["dtype"]])
        dtype = meta["dtype"]
        if dtype == "BF16":  # the upper half of a float32
            arr = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        elif dtype in ("F8_E4M3", "F8_E5M2"):
            arr = fp8_decode(raw, "e4m3" if dtype == "F8_E4M3" else "e5m2")
        elif dtype.startswith("F"):
            arr = raw.astype(np.float64)
        else:
            arr = raw.astype(np.int64)
        out[name] = arr.reshape(meta["shape"])
    return out


# ------------------------------------------------------------------------------------------ FP8
def fp8_decode(b: np.ndarray, fmt: str) -> np.ndarray:
    """The value of each float8 byte: sign, exponent, mantissa (e4m3fn: 0x7f/0xff are NaN, no inf)."""
    b = b.astype(np.int64)
    ebits, mbits, bias = (4, 3, 7) if fmt == "e4m3" else (5, 2, 15)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> mbits) & ((1 << ebits) - 1)
    man = (b & ((1 << mbits) - 1)).astype(np.float64)
    normal = (1.0 + man / 2**mbits) * np.exp2(exp - bias)
    subnormal = (man / 2**mbits) * 2.0 ** (1 - bias)
    val = sign * np.where(exp == 0, subnormal, normal)
    if fmt == "e4m3":
        val = np.where((exp == 15) & (man == 7), np.nan, val)
    else:
        val = np.where(exp == 31, np.where(man == 0, sign * np.inf, np.nan), val)
    return val


def _fp8_grid(fmt: str) -> np.ndarray:
    """The non-negative finite values of ``fmt``, in order; the index is the byte, so its parity is the
    parity of the mantissa (what "ties to even" picks)."""
    v = fp8_decode(np.arange(128), fmt)
    return v[np.isfinite(v)]


def round_to_fp8(v: np.ndarray, fmt: str) -> np.ndarray:
    """Nearest float8 value (ties to the even mantissa), saturating at the largest finite value."""
    grid = _fp8_grid(fmt)
    a = np.minimum(np.abs(v), grid[-1])
    hi = np.minimum(np.searchsorted(grid, a, side="left"), len(grid) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.sign(v) * grid[np.where(take_hi, hi, lo)]


FP8_FORMATS = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}


# ------------------------------------------------------------------------------------------ weights
def unpack_codes(packed: np.ndarray, container_bits: int, count: int, offset: int) -> np.ndarray:
    """Value ``i`` lives in byte ``i // n`` at bit ``(i % n) * container_bits`` (``n = 8 // bits``)."""
    n = 8 // container_bits
    assert packed.size == -(-count // n), f"{packed.size} bytes cannot hold {count} codes"
    p = packed.astype(np.int64)
    fields = [(p >> (j * container_bits)) & ((1 << container_bits) - 1) for j in range(n)]
    u = np.stack(fields, axis=1).reshape(-1)
    assert not u[count:].any(), "the padding of the last byte must be zero"
    return u[:count] + offset


@dataclass
class Weight:
    """A decoded weight flattened to ``[out, K]``: codes (fp8: values), and per-element scale / zero."""

    q: np.ndarray  # int64 codes (binary +-1, ternary -1/0/+1), or float64 fp8 values
    scale: np.ndarray  # float64 [out, K]
    zero: np.ndarray  # int64 [out, K] (zeros when the format has no zero point)
    scale_neg: np.ndarray | None  # TTQ: the scale of the -1 codes
    kind: str
    row_scales: bool  # one scale per output row: the weight can enter an integer GEMM
    shape: list[int]

    def dequantize(self) -> np.ndarray:
        if self.kind == "int":
            return (self.q - self.zero) * self.scale
        if self.kind == "ternary" and self.scale_neg is not None:
            return np.where(self.q > 0, self.scale, np.where(self.q < 0, -self.scale_neg, 0.0))
        return self.q * self.scale  # binary, one-scale ternary, fp8


def _spread(t: np.ndarray, e: dict[str, Any], shape: list[int]) -> np.ndarray:
    """A compact scale / zero point of a weight entry, one value per element of ``[out, K]``."""
    out, k = shape[0], int(np.prod(shape[1:]))
    g = e["granularity"]
    if g == "per_tensor":
        return np.broadcast_to(t.reshape(1), shape).reshape(out, k)
    if g == "per_channel":
        axis = e["axis"] % len(shape)
        view = [-1 if d == axis else 1 for d in range(len(shape))]
        return np.broadcast_to(t.reshape(view), shape).reshape(out, k)
    assert g == "per_group", g
    return np.repeat(t.reshape(out, k // e["group_size"]), e["group_size"], axis=1)


def decode_weight(e: dict[str, Any], tensors: dict[str, np.ndarray]) -> Weight:
    shape = [int(s) for s in e["shape"]]
    out, k = shape[0], int(np.prod(shape[1:]))
    c = e["codes"]
    raw = tensors[c["tensor"]]
    assert c["count"] == out * k
    if e["kind"] == "fp8":
        q = raw.reshape(out, k)  # already decoded to values by read_safetensors
        assert np.isfinite(q).all()
    elif c["packed"]:
        q = unpack_codes(raw.reshape(-1), c["container_bits"], c["count"], c["offset"]).reshape(out, k)
        if e["kind"] == "binary":
            q = 2 * q - 1  # bit 1 -> +1, bit 0 -> -1
    else:
        q = raw.reshape(out, k)
    if e["kind"] != "fp8":
        assert e["qmin"] <= q.min() and q.max() <= e["qmax"], "codes outside the format's range"
    scale = _spread(tensors[e["scale"]["tensor"]], e, shape)
    zp = e.get("zero_point")
    zero = np.zeros((out, k), np.int64) if zp is None else _spread(tensors[zp["tensor"]], e, shape)
    sn = e.get("scale_neg")
    scale_neg = None if sn is None else _spread(tensors[sn["tensor"]], e, shape)
    g = e["granularity"]
    row_scales = (
        e["kind"] in ("int", "binary", "ternary")
        and scale_neg is None
        and (g == "per_tensor" or (g == "per_channel" and e["axis"] % len(shape) == 0))
    )
    return Weight(q, scale, zero, scale_neg, e["kind"], row_scales, shape)


# ------------------------------------------------------------------------------------------ activations
@dataclass
class Act:
    """A quantized input: exact dequantized values, and for int formats the codes and qparams."""

    value: np.ndarray  # float64, the value the layer computes with
    q: np.ndarray | None = None  # int64 codes
    zero: np.ndarray | None = None  # int64, broadcast to the input's shape
    scale: np.ndarray | None = None  # float64 (float32 values), broadcast to the input's shape


def _row_reduce(x: np.ndarray, e: dict[str, Any], fn: Any) -> np.ndarray:
    """``fn`` over each row of values that share one scale, broadcast back to ``x``'s shape."""
    g = e["granularity"]
    if g == "per_tensor":
        r = fn(x, axis=None, keepdims=True)
    elif g == "per_token":
        r = fn(x, axis=-1, keepdims=True)
    elif g == "per_group":
        gs = e["group_size"]
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)
        r = np.broadcast_to(fn(xg, axis=-1, keepdims=True), xg.shape).reshape(x.shape)
    else:  # per_channel
        axis = e["channel_axis"] % x.ndim
        r = fn(x, axis=tuple(d for d in range(x.ndim) if d != axis), keepdims=True)
    return np.broadcast_to(r, x.shape)


def _static(t: np.ndarray, e: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A stored activation scale / zero point broadcast on the input."""
    if e["granularity"] == "per_channel":
        axis = e["channel_axis"] % x.ndim
        t = t.reshape([-1 if d == axis else 1 for d in range(x.ndim)])
    else:
        assert e["granularity"] == "per_tensor", e["granularity"]
        t = t.reshape([1] * x.ndim)
    return np.broadcast_to(t, x.shape)


def _f32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _dynamic_int(x: np.ndarray, e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) from each row's range, evaluated in float32."""
    qmin, qmax = e["qmin"], e["qmax"]
    lo = np.minimum(_row_reduce(x, e, np.min), np.float32(0))
    hi = np.maximum(_row_reduce(x, e, np.max), np.float32(0))
    if e["symmetric"]:
        bound = hi if qmin == 0 else np.maximum(-lo, hi)
        s = np.clip(bound / np.float32(qmax), SCALE_EPS, SCALE_MAX)
        return s, np.zeros(x.shape, np.float32)
    s = np.clip((hi - lo) / np.float32(qmax - qmin), SCALE_EPS, SCALE_MAX)
    z = np.clip(np.float32(qmin) - np.rint(lo / s), qmin, qmax)
    return s, z


def quantize_input(x: np.ndarray, e: dict[str, Any], tensors: dict[str, np.ndarray]) -> Act:
    """The input as the layer's input quantizer defines it (``x``: float32 array)."""
    x = _f32(x)
    if e.get("smooth") is not None:  # SmoothQuant: divide channel by channel first (last axis of linear)
        x = x / _f32(tensors[e["smooth"]["tensor"]])
    kind = e["kind"]
    stored = {k: None if e.get(k) is None else tensors[e[k]["tensor"]] for k in ("scale", "zero_point")}
    if kind == "binary":  # sign(x) with sign(0) = +1, times the scale when one is stored
        sign = np.where(x >= 0, 1.0, -1.0)
        s = 1.0 if stored["scale"] is None else _static(stored["scale"], e, x)
        return Act(sign * s)
    if kind == "fp8":
        fmax = float(_fp8_grid(FP8_FORMATS[e["format"]])[-1])
        if e["dynamic"]:
            s = np.clip(_row_reduce(np.abs(x), e, np.max) / np.float32(fmax), SCALE_EPS, SCALE_MAX)
        else:
            s = _f32(_static(stored["scale"], e, x))
        v = x * (np.float32(1) / s)  # float32, like the int formats
        return Act(round_to_fp8(v.astype(np.float64), FP8_FORMATS[e["format"]]) * s)
    if kind != "int":
        raise NotImplementedError(f"activation format {e['format']} ({kind}) is not covered by the oracle")
    if e["dynamic"]:
        s, z = _dynamic_int(x, e)
    else:
        s = _f32(_static(stored["scale"], e, x))
        zp = stored["zero_point"]
        z = np.zeros(x.shape, np.float32) if zp is None else _f32(_static(zp, e, x))
    r = np.rint(x * (np.float32(1) / s))  # float32 product, round half to even
    q = np.clip(r + z, e["qmin"], e["qmax"]).astype(np.int64)
    z = z.astype(np.int64)
    s = s.astype(np.float64)
    return Act((q - z) * s, q, z, s)


# ------------------------------------------------------------------------------------------ layers
@dataclass
class Result:
    """A layer's output in float64 and the magnitudes a float32 runtime's rounding error scales with."""

    y: np.ndarray
    exact: bool  # the float32 result must be ``y`` rounded once (lookups, activation quantizers)
    int_gemm: bool = False  # exact integer accumulation, one float rescale
    mag: np.ndarray | None = None  # int GEMM: |acc * sa * sw| + |bias|
    mag_sum: np.ndarray | None = None  # sum |x| |w| + |bias| (any float evaluation order)
    k: int = 0  # reduction length


def _patches(a: np.ndarray, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple) -> np.ndarray:
    """``a [B, C, *spatial]``, zero padded, -> ``[B, *out_spatial, C * prod(kernel)]``: the columns in the
    weight's ``(C, k1, k2, ...)`` order. Padding adds a real 0 (``q - z = 0`` for codes)."""
    d = len(kernel)
    a = np.pad(a, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    out = [(a.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    cols = []
    for offs in np.ndindex(*kernel):
        start = [offs[i] * dilation[i] for i in range(d)]
        index = tuple(slice(start[i], start[i] + stride[i] * (out[i] - 1) + 1, stride[i]) for i in range(d))
        cols.append(a[(slice(None), slice(None), *index)])
    p = np.stack(cols, axis=2)  # [B, C, prod(kernel), *out]
    return np.moveaxis(p.reshape(p.shape[0], -1, *out), 1, -1)


def _gemm(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a [..., K] @ w [out, K].T``: exact in int64, near exact in float64."""
    return np.einsum("...k,ok->...o", a, w)


class Export:
    """An export directory, read once; ``forward(name, x)`` computes one quantized layer."""

    def __init__(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        self.config = json.loads((out_dir / "quant_config.json").read_text())
        assert self.config["schema"] == "qatkit.quant_config" and self.config["schema_version"] in (1, 2)
        self.tensors = read_safetensors(out_dir / self.config["files"]["weights"]["path"])
        self.layers: dict[str, dict[str, Any]] = self.config["layers"]

    def folded_bn(self) -> dict[str, str]:
        """``{conv layer: the BatchNorm folded into it}``: those BatchNorms are identities when deployed."""
        return {n: e["folded_bn"] for n, e in self.layers.items() if e.get("folded_bn")}

    def weight(self, name: str) -> tuple[np.ndarray, Weight | None]:
        """The layer's weight as ``[out, K]`` float64 values, and the decoded codes (None: float weight)."""
        e = self.layers[name]
        if e.get("weight") is not None:
            w = decode_weight(e["weight"], self.tensors)
            return w.dequantize(), w
        wf = self.tensors[e["weight_float"]]
        return wf.reshape(wf.shape[0], -1), None

    def forward(self, name: str, x: np.ndarray, conv: dict[str, Any] | None = None) -> Result:
        """Layer ``name`` on the float32 array ``x`` (token ids for embeddings). Convolutions need their
        geometry, which the format does not store: ``conv = {stride, padding, dilation, groups,
        padding_mode}`` of the float module."""
        e = self.layers[name]
        op, ie = e["op"], e.get("input")
        if op == "activation":
            return Result(quantize_input(x, ie, self.tensors).value, exact=True)
        wd, w = self.weight(name)
        if op == "embedding":
            assert ie is None, "quantized embedding inputs are not defined"
            return Result(wd[np.asarray(x, np.int64)], exact=True)
        if op not in ("linear", "conv1d", "conv2d"):
            raise NotImplementedError(f"{name}: op {op!r} is not covered by the oracle")
        act = None if ie is None else quantize_input(x, ie, self.tensors)
        a_val = np.asarray(x, np.float64) if act is None else act.value
        a_int = sa = None  # integer GEMM operands: codes minus zero point, one scale per GEMM row
        if act is not None and act.q is not None:
            g = ie["granularity"]
            if g == "per_tensor" or (op == "linear" and ie["dynamic"] and g == "per_token"):
                a_int, sa = act.q - act.zero, act.scale[..., :1]

        def lift(t: np.ndarray) -> np.ndarray:
            return t

        if op != "linear":
            conv = conv or {}
            if conv.get("groups", 1) != 1 or conv.get("padding_mode", "zeros") != "zeros":
                raise NotImplementedError("the oracle covers convolutions with groups=1 and zero padding")
            d = 1 if op == "conv1d" else 2
            kernel = tuple((w.shape if w is not None else self.tensors[e["weight_float"]].shape)[2:])
            geo = [tuple(conv.get(k, (v,) * d)) for k, v in (("stride", 1), ("padding", 0), ("dilation", 1))]
            assert all(isinstance(p, int) for p in geo[1]), "string padding is not covered"
            a_val = _patches(a_val, kernel, *geo)
            if a_int is not None:
                a_int, sa = _patches(a_int, kernel, *geo), sa.reshape(-1)[:1]

            def lift(t: np.ndarray) -> np.ndarray:  # [B, *out, O] -> [B, O, *out]
                return np.moveaxis(t, -1, 1)

        b = 0.0 if e.get("bias") is None else self.tensors[e["bias"]].reshape(-1)
        mag_sum = lift(_gemm(np.abs(a_val), np.abs(wd)) + np.abs(b))
        if a_int is None or w is None or not w.row_scales:  # a float op on the dequantized values
            return Result(lift(_gemm(a_val, wd) + b), False, False, None, mag_sum, wd.shape[1])
        acc = _gemm(a_int, w.q - w.zero)  # the exact integer accumulator (int64)
        scaled = acc * (sa * w.scale[:, 0])
        return Result(lift(scaled + b), False, True, lift(np.abs(scaled) + np.abs(b)), mag_sum, wd.shape[1])
