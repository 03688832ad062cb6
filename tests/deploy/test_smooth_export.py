"""SmoothQuant layers through export: codes of ``W * s``, ``s`` with the input, schema version 2, the
integer runtime equal to the fake-quant model, ONNX within tolerance, and clear errors on bad files."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from helpers.export_models import quantize, tiny_gpt, train
from helpers.extras import require
from helpers.oracle_check import assert_matches_oracle
from safetensors.torch import load_file, save_file

import qat
from qat.deploy import ExportFormatError, schema
from qat.models import MLP

W8A8_SMOOTH = {
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "minmax"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "lsq"},
    "exclude": ["*_emb"],
    "smooth": 0.8,
}


@pytest.fixture(scope="module")
def smoothed(gpt_float, pytext, tmp_path_factory):
    model = quantize(gpt_float, W8A8_SMOOTH, pytext, qat_steps=3)
    out = tmp_path_factory.mktemp("smooth") / "e"
    report = qat.export(model, out, batches=pytext.val[:2], task="lm")
    return model, out, report


def test_runtime_reproduces_the_smoothed_fake_quant_model_exactly(smoothed, pytext):
    model, out, report = smoothed
    assert report.verification["passed"]
    cfg = json.loads((out / schema.CONFIG_FILE).read_text())
    assert cfg["schema_version"] == 2
    linears = [n for n, layer in cfg["layers"].items() if layer["op"] == "linear"]
    assert linears and all(cfg["layers"][n]["input"]["smooth"] is not None for n in linears)
    runtime = qat.load_quantized(out, tiny_gpt())
    assert sum(getattr(m, "uses_int_mm", False) for m in runtime.modules()) == len(linears)
    with torch.no_grad():
        for x, _ in pytext.val[:3]:
            assert torch.equal(runtime(x), model(x))
    # The reference divides by the stored factors itself (helpers.oracle), independently of both.
    assert_matches_oracle(out, tiny_gpt, [pytext.val[0][0]], runtime=runtime, fake_quant=model)


def test_exports_without_smoothing_stay_schema_version_1(gpt_float, pytext, tmp_path):
    model = quantize(gpt_float, {**W8A8_SMOOTH, "smooth": None}, pytext, qat_steps=0)
    qat.export(model, tmp_path / "e", verify=False)
    cfg = json.loads((tmp_path / "e" / schema.CONFIG_FILE).read_text())
    assert cfg["schema_version"] == 1
    assert all(layer["input"].get("smooth") is None for layer in cfg["layers"].values() if layer["input"])


def _edit_config(d, edit) -> None:
    cfg = json.loads((d / schema.CONFIG_FILE).read_text())
    edit(cfg)
    (d / schema.CONFIG_FILE).write_text(json.dumps(cfg))


def test_smooth_in_a_version_1_file_or_on_a_non_linear_op_is_refused(smoothed, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(smoothed[1], d)
    _edit_config(d, lambda c: c.update(schema_version=1))
    with pytest.raises(ExportFormatError, match="'smooth' needs schema_version 2"):
        qat.load_quantized(d, tiny_gpt())
    _edit_config(d, lambda c: c.update(schema_version=2))
    _edit_config(d, lambda c: c["layers"]["blocks.0.mlp.fc"].update(op="conv1d"))
    with pytest.raises(ExportFormatError, match="only defined for op 'linear'"):
        qat.load_quantized(d, tiny_gpt())


def test_smooth_of_the_wrong_length_is_refused(smoothed, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(smoothed[1], d)
    tensors = load_file(str(d / schema.WEIGHTS_FILE))
    name = "blocks.0.mlp.fc.input.smooth"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(d / schema.WEIGHTS_FILE))
    data = (d / schema.WEIGHTS_FILE).read_bytes()

    def edit(c):
        c["layers"]["blocks.0.mlp.fc"]["input"]["smooth"]["shape"] = [tensors[name].numel()]
        c["files"]["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_config(d, edit)
    with pytest.raises(ExportFormatError, match=r"blocks\.0\.mlp\.fc: input\.smooth has 31 values"):
        qat.load_quantized(d, tiny_gpt())


def test_a_smoothed_layer_with_one_quantizer_off_is_refused(smoothed, tmp_path):
    import copy

    from qat.deploy import ExportError

    model = copy.deepcopy(smoothed[0])
    model.blocks[0].mlp.fc.input_quant.enable_fake_quant(False)
    with pytest.raises(ExportError, match=r"blocks\.0\.mlp\.fc: a SmoothQuant layer needs both"):
        qat.export(model, tmp_path / "e", verify=False)
    assert not (tmp_path / "e").exists()


def test_onnx_of_a_smoothed_model_matches(digits, tmp_path):
    onnx = require("onnx", extra="onnx")
    require("onnxruntime", extra="onnx")
    torch.manual_seed(0)
    mlp = train(MLP(hidden=(64, 64)), digits.train, steps=150, lr=1e-2, task="classification")
    model = quantize(mlp, {**W8A8_SMOOTH, "exclude": []}, digits, qat_steps=5)
    report = qat.export(model, tmp_path / "e", batches=digits.val, task="classification", targets="onnx")
    o = report.onnx
    assert o["passed"] and o["top1_agreement_best"] == 1.0 and o["max_rel_logit_diff_best"] <= 1e-3
    assert o["quantize_linear"] == 3
    graph = onnx.load(str(tmp_path / "e" / schema.ONNX_FILE)).graph
    assert sum(n.op_type == "Div" for n in graph.node) == 3  # x / s before each QuantizeLinear
    assert_matches_oracle(tmp_path / "e", lambda: MLP(hidden=(64, 64)), [digits.val[0][0]], fake_quant=model)
