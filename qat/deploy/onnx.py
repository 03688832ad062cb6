"""The ONNX target: ``model.onnx`` (opset 21) that onnxruntime runs on its integer kernels, checked in
onnxruntime against the fake-quant model.

The model is rebuilt from the export directory with the target's modules (:mod:`qat.deploy.qdq`) and
traced by ``torch.onnx.export`` (dynamo). Linear layers and convolutions whose formats have an integer GEMM
(int weights per tensor or per output channel, int activations per tensor, static or dynamic, or per
token) become standard integer ops: ``Mul(x, 1/s)`` -> ``QuantizeLinear`` (scale 1) -> ``MatMulInteger`` /
``ConvInteger`` on the int8 weight codes -> ``Cast`` -> ``Mul(s_x * s_w)`` -> ``Add(bias)``. By the ONNX
spec that is exactly :mod:`qat.quant.intgemm`'s arithmetic (the codes ``round_half_even(x * (1/s)) + z``,
an exact int32 sum, two float32 roundings), so onnxruntime reproduces the evaluated fake-quant model bit
for bit (``max_abs_logit_diff`` 0), while a QDQ graph (``DequantizeLinear`` weights) is summed in float,
requantized by onnxruntime's own fused kernels (``x / s``, not ``x * (1/s)``) and flips activation codes
the fake-quant model does not.

Users load the file with a plain ``onnxruntime.InferenceSession(path)``: no session option is needed.
Weights are constant initializers, so onnxruntime prepacks them once at load and runs its int8 GEMMs (MLAS
u8s8, VNNI/AMX where the CPU has them); its ``MatMul`` + ``Add`` -> ``Gemm`` pre-fusion, which keeps a QDQ
weight's ``DequantizeLinear`` in the float path, has no ``MatMul`` to fuse. On x86 CPUs without VNNI,
MLAS's u8s8 kernels may saturate 16-bit pair sums (onnxruntime's "reduce_range" caveat): verification
runs where the export runs, so it would say so.

Other layers keep the QDQ form: integer weight initializers behind ``DequantizeLinear`` (blocked for
per-group weights), activations through ``QuantizeLinear`` -> (``Clip``) -> ``DequantizeLinear``; what
has no QDQ form is plain ONNX arithmetic (fp8/binary/ternary activations, per-channel activations, TTQ
weights, registered custom layer types). Weights of 4 bits or fewer are stored as ``INT4`` / ``UINT4``
initializers (a ``Cast`` to int8, folded at load, feeds the integer ops).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.calibrate import batch_inputs
from qat.deploy.loader import load_with
from qat.deploy.qdq import QdqIntGemm, QdqWeight, translation_table
from qat.deploy.registry import TARGETS, ExportJob
from qat.deploy.verify import Forward, VerificationError, check, compare, default_forward
from qat.io import write_bytes_atomic

OPSET = 21


def load_qdq(out_dir: str | Path, model: nn.Module) -> nn.Module:
    """The export rebuilt with the ONNX target's QDQ modules (what :func:`export_onnx` traces)."""
    return load_with(out_dir, model, target="onnx").eval()


def write(job: ExportJob) -> dict[str, Any]:
    """The ONNX target of an export (:data:`qat.deploy.registry.TARGETS`): ``model.onnx`` in the export
    directory, checked against the fake-quant model on the verification batches."""
    if job.example is None:
        raise ValueError("format=onnx needs batches or example_input to trace the model")
    return export_onnx(
        job.directory, job.skeleton(), job.directory / TARGETS["onnx"].file, job.example,
        reference=job.reference, batches=job.batches, task=job.task, forward=job.forward,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- export
def _pack_nibbles(arr: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 raw layout: two values per byte, the first in the low nibble."""
    v = (arr.reshape(-1) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def _to_int4(model: Any, names: dict[str, bool]) -> int:
    """Re-type the int8 codes feeding each 4-bit ``DequantizeLinear`` (and its zero point), or each 4-bit
    ``MatMulInteger`` / ``ConvInteger`` weight (behind a ``Cast`` to int8, which onnxruntime folds at load),
    as INT4/UINT4 (opset 21).

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
    casts = []
    for node in model.graph.node:
        slots = _INT4_SLOTS.get(node.op_type, ())
        if not slots or node.input[slots[0]] not in names or node.input[slots[0]] not in inits:
            continue
        dtype = onnx.TensorProto.INT4 if names[node.input[slots[0]]] else onnx.TensorProto.UINT4
        for i in slots:
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
            if node.op_type != "DequantizeLinear":  # integer ops take int8: widen at load
                wide = f"{new_name}_int8"
                casts.append(helper.make_node("Cast", [new_name], [wide], to=onnx.TensorProto.INT8))
                node.input[i] = wide
        done += 1
    nodes = [*casts, *model.graph.node]  # a Cast's input is an initializer: first in topological order
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


# Inputs re-typed to 4 bits, per op: the codes first (DequantizeLinear: its zero point with them).
_INT4_SLOTS = {"DequantizeLinear": (0, 2), "MatMulInteger": (1,), "ConvInteger": (1,)}
INTEGER_OPS = ("MatMulInteger", "ConvInteger")


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
    qdq = load_qdq(out_dir, skeleton)
    int4 = {
        f"{n}.codes": m.signed
        for n, m in qdq.named_modules()
        if isinstance(m, (QdqWeight, QdqIntGemm)) and not getattr(m, "float_fallback", False) and m.int4
    }
    example = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if isinstance(t, torch.Tensor) else None for t in example)
    t0 = time.time()
    prog = torch.onnx.export(
        qdq, example, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
        custom_translation_table=translation_table(), verbose=False,
    )  # fmt: skip
    proto = prog.model_proto
    n_int4 = _to_int4(proto, int4)
    for node in proto.graph.node:  # stack traces and FX node dumps: most of the file, no use at run time
        del node.metadata_props[:]
    path = Path(path)
    write_bytes_atomic(path, proto.SerializeToString())  # never half a model.onnx
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
        "integer_ops": sum(ops.get(op, 0) for op in INTEGER_OPS),
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

    # Integer-op layers are exact; QDQ layers sum in onnxruntime's own order: compared with the closer of
    # the integer and the float fake-quant evaluation (see qat.deploy.verify).
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


__all__ = ["export_onnx", "load_qdq", "onnx_session_forward", "ort_session", "write"]
