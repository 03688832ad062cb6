"""The ONNX target: the export as a QDQ graph, integer weight initializers behind ``DequantizeLinear``,
activations through ``QuantizeLinear`` -> (``Clip``) -> ``DequantizeLinear``, checked in onnxruntime.

The model is rebuilt from the export directory with the target's QDQ modules (:mod:`qat.deploy.qdq`) and
traced by ``torch.onnx.export`` (dynamo, opset 21). Weights of 4 bits or fewer are stored as ``INT4`` /
``UINT4`` initializers (opset 21). What has no QDQ form is exported as plain ONNX arithmetic: dynamic
activation scales (``ReduceMin``/``ReduceMax`` at run time), fp8/binary/ternary activations, TTQ weights
(two scales) and weights of registered custom layer types (float initializers).
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
from qat.deploy.qdq import QdqWeight, translation_table
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


__all__ = ["export_onnx", "load_qdq", "onnx_session_forward", "ort_session", "write"]
