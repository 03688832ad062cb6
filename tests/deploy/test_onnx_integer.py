"""The ONNX target's integer path: layers whose formats have an integer GEMM are exported as
``MatMulInteger`` / ``ConvInteger`` graphs that onnxruntime keeps as integer kernels after its own graph
optimisations, and that compute, bit for bit, what the ONNX spec says (``onnx.reference``), what the
target's torch modules compute, and what the fake-quant model computes in eval mode."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers.extras import require
from torch import nn

import qat
from qat.deploy import schema
from qat.deploy.onnx import load_qdq

onnx = require("onnx", extra="onnx")
ort = require("onnxruntime", extra="onnx")
require("onnxscript", extra="onnx")

warnings.filterwarnings("ignore", category=FutureWarning)

# Ops that multiply by a float weight: none may remain once the integer path applies (the regression
# this guards against: MatMul+Add pre-fused into a Gemm that keeps the weight's DequantizeLinear).
FLOAT_MATMULS = {"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "Conv", "FusedConv", "NchwcConv"}
INTEGER_KERNELS = {"MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                   "QGemm", "QLinearMatMul", "QLinearConv"}  # fmt: skip


class Net(nn.Module):
    """Convolutions, then a residual FFN block and a head: only exact float ops between the quantized
    layers (ReLU, slicing, a residual add), so every output bit is determined by the integer layers."""

    def __init__(self, conv: bool = True) -> None:
        super().__init__()
        self.conv = conv
        if conv:
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv1d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.fc1, self.fc2, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            x = torch.relu(self.c2(torch.relu(self.c1(x))[:, :, 2])).flatten(1)
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def _spec(fmt: str, gran: str = "per_tensor", **kw) -> dict:
    return {"format": fmt, "granularity": gran, "scale": "minmax", **kw}


W8 = _spec("int8", "per_channel")
ASYM = {"symmetric": False}
CASES = {  # name: (weight, activation, conv layers too)
    "w8a8": (W8, _spec("int8", **ASYM), True),
    "w8a8_symmetric": (W8, _spec("int8"), True),
    "w8_per_tensor_a_uint8": (_spec("int8"), _spec("uint8", **ASYM), True),
    "w4a4": (_spec("int4", "per_channel"), _spec("int4", **ASYM), True),
    "w_uint4_asymmetric": (_spec("uint4", "per_channel", **ASYM), _spec("int8", **ASYM), True),
    "a8_dynamic": (W8, {"format": "int8", "granularity": "per_tensor", "dynamic": True, **ASYM}, True),
    "a8_per_token": (W8, {"format": "int8", "granularity": "per_token", "dynamic": True, **ASYM}, False),
    "a8_per_token_symmetric": (W8, {"format": "int8", "granularity": "per_token", "dynamic": True}, False),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``name -> (fake-quant model, float model, inputs, ONNX figures, model.onnx path)``, each case exported
    once per module (with the export's own verification in onnxruntime)."""
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = _export(tmp_path_factory.mktemp(name), name)
        return done[name]

    return get


def _export(tmp_path, name: str):
    weight, act, conv = CASES[name]
    torch.manual_seed(0)
    float_model = Net(conv).eval()
    shape = (4, 3, 8, 8) if conv else (4, 3, 16)  # linears on [B, T, K] when there are no convolutions
    xs = [torch.randn(*shape) * 2 for _ in range(3)]
    model = qat.prepare(copy.deepcopy(float_model), {"weight": weight, "activation": act, "include": ["*"]})
    qat.calibrate(model, [(x,) for x in xs])
    model.eval()
    report = qat.export(model, tmp_path / "e", batches=[(x,) for x in xs], targets="onnx")
    return model, float_model, xs, report.onnx, tmp_path / "e"


def _session(path, optimized=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _quantized_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


@pytest.mark.parametrize("name", ["w8a8", "a8_dynamic", "a8_per_token"])
def test_onnxruntime_keeps_integer_kernels(name, exported, tmp_path):
    model, _, _, figures, out = exported(name)
    # default graph optimisations (what a plain InferenceSession gets), the result written out
    _session(out / schema.ONNX_FILE, optimized=tmp_path / "optimized.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    kernels = [op for op in ops if op in INTEGER_KERNELS]
    assert not FLOAT_MATMULS & set(ops) and "DequantizeLinear" not in ops, ops
    assert len(kernels) == _quantized_layers(model) == figures["integer_ops"]


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_equals_integer_emulation(name, exported):
    from onnx.reference import ReferenceEvaluator

    model, float_model, xs, figures, out = exported(name)
    path = out / schema.ONNX_FILE
    assert figures["passed"] and figures["max_abs_logit_diff"] == 0.0  # vs the fake-quant integer eval
    sess, spec = _session(path), ReferenceEvaluator(str(path))
    emulation = load_qdq(out, copy.deepcopy(float_model))
    # Inputs on the first quantizer's rounding ties, (k + 1/2) * s: x * (1/s) (the fake quant's rule) and
    # x / s (QuantizeLinear's) round some of them to different codes.
    first = model.c1 if hasattr(model, "c1") else model.fc1
    s, _ = first.input_quant.qparams(xs[0])
    ties = (torch.randint(-60, 60, (5, *xs[0].shape[1:])) + 0.5) * s.reshape(-1)[0]
    for x in [*xs, torch.randn(7, *xs[0].shape[1:]), ties]:  # any batch size (more than one row per scale)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            fake_quant, torch_graph = model(x).numpy(), emulation(x).numpy()
        np.testing.assert_array_equal(got, spec.run(None, feed)[0])  # the ONNX spec's arithmetic
        np.testing.assert_array_equal(got, torch_graph)  # the target's modules, run in torch
        np.testing.assert_array_equal(got, fake_quant)  # what was evaluated is what runs
