"""ONNX export as a QDQ graph: integer weight initializers behind ``DequantizeLinear``, activations
through ``QuantizeLinear`` -> (``Clip``) -> ``DequantizeLinear``, checked in onnxruntime.

The model is rebuilt from the export directory with QDQ modules whose two custom torch ops
(``qat_export::dequantize`` and ``qat_export::quantize_dequantize``) compute in PyTorch exactly what the
ONNX nodes compute, and translate to those nodes in ``torch.onnx.export`` (dynamo, opset 21). Weights of
4 bits or fewer are stored as ``INT4`` / ``UINT4`` initializers (opset 21). What has no QDQ form is
exported as plain ONNX arithmetic: dynamic activation scales (``ReduceMin``/``ReduceMax`` at run time),
fp8/binary/ternary activations, TTQ weights (two scales) and weights of registered custom layer types
(float initializers).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat.calibrate import batch_inputs
from qat.deploy.loader import load_with
from qat.deploy.runtime import (
    DequantLayer,
    IntConv,
    IntEmbedding,
    QWeight,
    RuntimeActQuant,
)
from qat.deploy.verify import Forward, VerificationError, check, compare, default_forward

OPSET = 21


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


def _translation_table() -> dict[Any, Any]:
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


# ----------------------------------------------------------------------------------------------- QDQ modules
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
        g = e["granularity"]
        q = qw.q
        zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale)
        if g == "per_group":  # DequantizeLinear blocks run along axis 1 of the [out, K] matrix
            q = q.reshape(self.shape[0], -1)
            self.axis, self.block = 1, int(e["group_size"])
            scale, zp = qw.scale.reshape(self.shape[0], -1), zp.reshape(self.shape[0], -1)
        elif g == "per_channel":
            self.axis, self.block = int(e.get("axis", 0)) % len(self.shape), 0
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


class QdqLayer(nn.Module):
    """Linear / Conv / Embedding over a dequantized weight node, with a QDQ'd input."""

    def __init__(self, op: str, mod: nn.Module, qw: QWeight | None, fw: torch.Tensor | None,
                 bias: torch.Tensor | None, act: RuntimeActQuant | None) -> None:  # fmt: skip
        super().__init__()
        self.op = op
        self.wq = QdqWeight(qw) if qw is not None else None
        if fw is not None:
            self.register_buffer("weight", fw)
        self.register_buffer("bias", bias)
        self.act = QdqAct(act) if act is not None else None
        if op in ("conv1d", "conv2d"):
            self.conv = IntConv(mod, None, torch.empty(0), None, None, int_matmul=False)
            del self.conv.weight
        if op == "embedding":
            self.emb = IntEmbedding(mod, None, torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.wq() if self.wq is not None else self.weight
        if self.op == "embedding":
            e = self.emb
            return F.embedding(x, w, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        if self.act is not None:
            x = self.act(x)
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        return self.conv._conv(x, w, self.bias)


def _build_qdq(op: str, mod: nn.Module, qw: QWeight | None, fw: torch.Tensor | None,
               bias: torch.Tensor | None, act: RuntimeActQuant | None) -> nn.Module:  # fmt: skip
    if op == "generic":
        return DequantLayer(mod, qw, act)
    return QdqLayer(op, mod, qw, fw, bias, act)


def load_qdq(out_dir: str | Path, model: nn.Module) -> nn.Module:
    """The export rebuilt with QDQ modules (what :func:`export_onnx` traces); standalone activation
    quantizers (attention q/k/v) become :class:`QdqAct` too."""
    m = load_with(out_dir, model, _build_qdq)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, RuntimeActQuant):
            parent_name, _, attr = name.rpartition(".")
            parent = m.get_submodule(parent_name) if parent_name else m
            if not isinstance(parent, (QdqLayer, DequantLayer)):
                setattr(parent, attr, QdqAct(mod))
    return m.eval()


# ----------------------------------------------------------------------------------------------- export
def _pack_nibbles(arr: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 raw layout: two values per byte, the first in the low nibble."""
    v = (arr.reshape(-1) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def _to_int4(model: Any, names: dict[str, bool]) -> int:
    """Re-type the int8 codes (and zero point) feeding each 4-bit DequantizeLinear as INT4/UINT4 (opset 21).

    ``names``: codes initializer name -> signed. A zero point the exporter shared with other nodes (equal
    constants are merged) gets its own INT4 copy so the other nodes keep their int8 one.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in names or node.input[0] not in inits:
            continue
        dtype = onnx.TensorProto.INT4 if names[node.input[0]] else onnx.TensorProto.UINT4
        for i in (0, 2):
            if i >= len(node.input) or node.input[i] not in inits:
                continue
            name = node.input[i]
            arr = numpy_helper.to_array(inits[name]).astype(np.int32)
            new_name = name if uses.get(name, 0) == 1 else f"{name}_int4_{done}"
            new = helper.make_tensor(new_name, dtype, arr.shape, _pack_nibbles(arr), raw=True)
            if new_name == name:
                inits[name].CopyFrom(new)
            else:
                model.graph.initializer.append(new)
                node.input[i] = new_name
        done += 1
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def export_onnx(
    out_dir: str | Path,
    skeleton: nn.Module,
    path: str | Path,
    example_input: Any,
    *,
    reference: nn.Module | None = None,
    batches: Iterable[Any] | None = None,
    task: str | None = None,
    forward: Forward = default_forward,
) -> dict[str, Any]:
    """Write ``path`` (a QDQ ONNX model of the export in ``out_dir``) and, given ``reference`` (the
    fake-quant model) and ``batches``, check onnxruntime's outputs against it with the export criteria.

    ``skeleton``: the float model the export came from (consumed). Returns the figures for the report;
    raises :class:`VerificationError` when onnxruntime disagrees.
    """
    import onnx

    qdq = load_qdq(out_dir, skeleton)
    int4 = {
        f"{n}.codes": m.signed
        for n, m in qdq.named_modules()
        if isinstance(m, QdqWeight) and not m.float_fallback and m.int4
    }
    example = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if isinstance(t, torch.Tensor) else None for t in example)
    t0 = time.time()
    prog = torch.onnx.export(
        qdq, example, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
        custom_translation_table=_translation_table(), verbose=False,
    )  # fmt: skip
    proto = prog.model_proto
    n_int4 = _to_int4(proto, int4)
    for node in proto.graph.node:  # stack traces and FX node dumps: most of the file, no use at run time
        del node.metadata_props[:]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # temp + rename: never half a model.onnx
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    figures: dict[str, Any] = {
        "path": path.name,
        "opset": OPSET,
        "bytes": path.stat().st_size,
        "int4_initializers": n_int4,
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "export_s": round(time.time() - t0, 2),
    }
    if reference is None or not batches:
        return figures
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]

    def run_ort(batch: Any) -> torch.Tensor:
        x = batch_inputs(batch)
        xs = x if isinstance(x, tuple) else (x,)
        out = sess.run(None, {n: t.numpy() for n, t in zip(names, xs, strict=True)})[0]
        return torch.from_numpy(out)

    # onnxruntime sums in its own order: compared with the closer of the integer and the float fake-quant
    # evaluation (see qat.deploy.verify).
    figs = compare(reference, run_ort, batches, task=task, forward=forward, float_reference=True)
    fails = check(figs, task)  # the integer runtime's tolerance, against the closer of two references
    figures.update(figs)
    if fails:
        raise VerificationError(f"ONNX model {path} failed verification in onnxruntime: " + "; ".join(fails))
    return figures


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with default graph optimisations (what users get) and quiet logs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_session_forward(path: str | Path, threads: int | None = None) -> Any:
    """A callable ``inputs -> logits`` running ``path`` in onnxruntime (used by ``qat-eval``)."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    return run


__all__ = [
    "QdqAct",
    "QdqLayer",
    "QdqWeight",
    "export_onnx",
    "load_qdq",
    "onnx_session_forward",
    "ort_session",
]
