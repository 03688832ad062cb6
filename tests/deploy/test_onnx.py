"""ONNX QDQ export: onnxruntime runs it and matches the fake-quant model within the export tolerances."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers.export_models import quant_cfg, quantize, tiny_gpt
from helpers.extras import require

import qat
from qat.deploy import schema
from qat.deploy.onnx import export_onnx, ort_session

onnx = require("onnx", extra="onnx")
require("onnxruntime", extra="onnx")
require("onnxscript", extra="onnx")  # torch.onnx.export's dynamo exporter

warnings.filterwarnings("ignore", category=FutureWarning)


def _check_graph(path, int4: bool, integer: bool) -> onnx.ModelProto:
    """``integer``: every quantized layer is an integer op (no DequantizeLinear left); else QDQ weights."""
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and ("DequantizeLinear" in ops) is not integer
    types = {t.data_type for t in m.graph.initializer}
    assert onnx.TensorProto.FLOAT16 not in types
    assert (onnx.TensorProto.INT4 in types) is int4
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    for node in m.graph.node:  # every float weight of a Conv/Gemm/MatMul comes out of a DequantizeLinear
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] not in producer:
            pytest.fail(f"{node.op_type} {node.name} reads a float weight initializer")
        if node.op_type in ("Conv", "Gemm"):
            assert producer.get(node.input[1]) == "DequantizeLinear"
    return m


@pytest.mark.parametrize("name,int4", [("w8a8", False), ("w4a4", True)])
def test_digits_onnx_round_trip(name, int4, digits, digits_float, tmp_path):
    model = quantize(digits_float, quant_cfg(name), digits, qat_steps=3)
    report = qat.export(model, tmp_path / "e", batches=digits.val, task="classification", targets="onnx")
    o = report.onnx
    assert o["passed"] and o["top1_agreement_best"] == 1.0 and o["max_rel_logit_diff_best"] <= 1e-3
    assert (o["int4_initializers"] == 4) is int4 and o["quantize_linear"] == 4
    assert o["integer_ops"] == 4 and o["max_abs_logit_diff"] == 0.0  # MatMulInteger / ConvInteger: exact
    _check_graph(tmp_path / "e" / schema.ONNX_FILE, int4, integer=True)
    # Any batch size: the batch dimension is dynamic.
    sess = ort_session(tmp_path / "e" / schema.ONNX_FILE)
    x = digits.val[0][0][:3].numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = model(digits.val[0][0][:3]).detach().numpy()
    assert out.shape == (3, 10) and np.abs(out - ref).max() <= 1e-3 * (ref.max() - ref.min())


@pytest.mark.slow
def test_gpt_onnx_round_trip_with_attention_and_groups(pytext, gpt_float, tmp_path):
    cfg = {**quant_cfg("w4g32a8dyn"), "attention": {"format": "int8"}}
    model = quantize(gpt_float, cfg, pytext, qat_steps=0)
    qat.export(model, tmp_path / "e", verify=False)
    figures = export_onnx(tmp_path / "e", tiny_gpt(), tmp_path / "m.onnx", pytext.val[0][0], reference=model,
                          batches=pytext.val[:2], task="lm")  # fmt: skip
    a, b = figures["perplexity_reference"], figures["perplexity_exported"]
    assert abs(a - b) <= 5e-5 * a
    assert figures["quantize_linear"] == 6  # q, k, v of both blocks; dynamic activations are plain ops
    m = _check_graph(tmp_path / "m.onnx", int4=True, integer=False)
    blocked = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]  # fmt: skip
    assert blocked  # per-group weights use DequantizeLinear's blocked form
