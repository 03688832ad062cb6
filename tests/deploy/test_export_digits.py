"""Export -> load -> compare on digits for every weight/activation format the configs offer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.export_models import quant_cfg, quantize
from helpers.oracle_check import assert_matches_oracle
from safetensors import safe_open

import qat
from qat.deploy import ExportReport, schema
from qat.deploy.runtime import AbsentWeight, IntConv, IntLinear
from qat.models import DigitsCNN

CONFIGS = [
    "w8a8", "w4a4", "w2a2", "w4a8", "w3a4", "w4a4_pact", "binary", "xnor", "bitnet",
    "ternary_twn", "ternary_ttq", "fp8_e4m3", "fp8_e4m3_dyn", "fp8_e5m2",
]  # fmt: skip
EXTRA = {
    # symmetric static int8 on both sides: the textbook W8A8 integer GEMM
    "w8a8_sym": {
        "weight": {"format": "int8", "granularity": "per_channel"},
        "activation": {"format": "int8"},
    },
    # unsigned asymmetric 8-bit weights (codes 0..255) and activations
    "wu8au8": {
        "weight": {"format": "uint8", "granularity": "per_channel", "symmetric": False},
        "activation": {"format": "uint8", "symmetric": False},
    },
    # weight only, 4-bit groups of 9 (one 3x3 kernel per group in the convs, 8 in fc)
    "w4g9": {
        "weight": {"format": "int4", "granularity": "per_group", "group_size": 9},
        "activation": None,
        "overrides": {"fc": {"weight": {"group_size": 8}}},
    },
    # per-tensor weights, per-channel static activations (no integer GEMM: scales vary along K)
    "w4a8_chan": {
        "weight": {"format": "int4", "granularity": "per_tensor"},
        "activation": {"format": "int8", "granularity": "per_channel"},
    },
    # dynamic per-tensor int8 activations
    "w8a8_dyn": {
        "weight": {"format": "int8", "granularity": "per_channel"},
        "activation": {"format": "int8", "dynamic": True, "symmetric": False},
    },
}
# Formats whose every layer runs the integer GEMM (int weights per channel/tensor, int activations
# per tensor).
INT_GEMM = {"w8a8", "w4a4", "w2a2", "w4a8", "w3a4", "w4a4_pact", "binary", "ternary_twn", "w8a8_sym",
            "wu8au8", "w8a8_dyn"}  # fmt: skip


def _cfg(name: str) -> dict:
    return copy.deepcopy(EXTRA[name]) if name in EXTRA else quant_cfg(name)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, batches) -> float:
    with torch.no_grad():
        return max(float((a(x) - b(x)).abs().max()) for x, _ in batches)


# The default run covers each storage format (int8, packed int4/int2, binary, ternary, fp8, per-group,
# unsigned asymmetric, dynamic); `-m slow` runs every config in qat/conf/quant on digits.
FAST = {"w8a8", "w4a4", "w2a2", "binary", "ternary_ttq", "fp8_e4m3", "w4g9", "wu8au8", "w8a8_dyn"}
PARAMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS + list(EXTRA)]


@pytest.mark.parametrize("name", PARAMS)
def test_export_reload_matches_fake_quant(name, digits, digits_float, tmp_path):
    model = quantize(digits_float, _cfg(name), digits, qat_steps=5)
    out = tmp_path / "export"
    report = qat.export(model, out, batches=digits.val, task="classification")
    assert isinstance(report, ExportReport)
    v = report.verification
    # Free-running and exact: eval-mode fake quant and the runtime share their arithmetic.
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] == 0.0
    assert v["items"] == sum(len(y) for _, y in digits.val)
    assert report.budget_ok and report.exported_bytes <= 1.02 * report.budget_bytes
    assert report.exported_bytes < report.float_bytes
    on_disk = json.loads((out / schema.REPORT_FILE).read_text())
    assert on_disk["verification"]["top1_agreement"] == 1.0 and on_disk["ratio"] == report.ratio

    # A fresh skeleton with random weights: everything comes from the export directory.
    runtime = qat.load_quantized(out, DigitsCNN())
    layers = [m for m in runtime.modules() if isinstance(m, (IntLinear, IntConv))]
    assert len(layers) == 4
    if name in INT_GEMM:
        assert all(
            m.uses_int_mm and m.w_int.dtype == torch.int8 and type(m.weight) is AbsentWeight for m in layers
        )
    assert _max_diff(runtime, model, digits.val) == 0.0  # a fresh skeleton: still bit for bit
    # Both share their integer GEMM code, so the checks above cannot see a bug in it: compare both with
    # the independent reference (numpy, from the format definition), layer by layer and end to end.
    val = [x for x, _ in digits.val[:1]]
    assert_matches_oracle(out, DigitsCNN, val, runtime=runtime, fake_quant=model)

    # The dequantisation path (int_matmul=False) reproduces the float fake-quant forward bit for bit
    # (what the model computes with autograd on).
    exact = qat.load_quantized(out, DigitsCNN(), int_matmul=False)
    with torch.no_grad():
        ref = [exact(x) for x, _ in digits.val]
    with torch.enable_grad():
        fq = [model(x).detach() for x, _ in digits.val]
    assert all(torch.equal(r, f) for r, f in zip(ref, fq, strict=True))


def test_stored_tensors_are_integers_and_packed(digits, digits_float, tmp_path):
    model = quantize(digits_float, quant_cfg("w2a2"), digits, qat_steps=0)
    qat.export(model, tmp_path / "e", batches=digits.val, task="classification")
    cfg = json.loads((tmp_path / "e" / schema.CONFIG_FILE).read_text())
    conv2 = cfg["layers"]["conv2"]["weight"]
    assert conv2["format"] == "int2" and conv2["codes"]["packed"] and conv2["codes"]["container_bits"] == 2
    assert cfg["layers"]["conv2"]["input"]["zero_point"] is not None  # asymmetric LSQ+ activations
    with safe_open(tmp_path / "e" / schema.WEIGHTS_FILE, "pt") as f:
        codes = f.get_tensor("conv2.weight.codes")
        assert codes.dtype == torch.uint8 and codes.numel() == 32 * 16 * 9 // 4  # four 2-bit codes per byte
        assert f.get_tensor("conv2.weight.scale").shape == (32,)
        assert "bn2.running_mean" in f.keys()  # float-kept tensors travel too
        assert not any(k.endswith("weight_quant.scale") for k in f.keys())


def test_weight_only_int8_storage(digits, digits_float, tmp_path):
    model = quantize(digits_float, {"weight": {"format": "int6", "granularity": "per_channel"}}, digits, 0)
    report = qat.export(model, tmp_path / "e", batches=digits.val, task="classification")
    with safe_open(tmp_path / "e" / schema.WEIGHTS_FILE, "pt") as f:
        assert f.get_tensor("conv3.weight.codes").dtype == torch.int8  # 5..8 bits: one byte per code
    assert report.verification["max_abs_logit_diff"] == 0.0  # weight-only: dequantised once, exact
    assert_matches_oracle(tmp_path / "e", DigitsCNN, [digits.val[0][0]], fake_quant=model)


def test_top_level_api_and_prepared_or_meta_skeleton(digits, digits_float, tmp_path):
    model = quantize(digits_float, quant_cfg("w4a4"), digits, qat_steps=0)
    qat.export(model, tmp_path / "e")  # no batches: written without verification
    x = digits.val[0][0]
    a = qat.load_quantized(tmp_path / "e", DigitsCNN())
    b = qat.load_quantized(tmp_path / "e", copy.deepcopy(model))  # a prepared skeleton is converted
    with torch.device("meta"):
        skeleton = DigitsCNN()
    c = qat.load_quantized(tmp_path / "e", skeleton)  # no weights at all in the skeleton
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    assert qat.deploy.load_quantized is qat.load_quantized


def test_conv_bn_folding_exports_folded_conv(digits, digits_float, tmp_path):
    cfg = quant_cfg("w4a4")
    cfg["fold_bn"] = True
    model = quantize(digits_float, cfg, digits, qat_steps=5)
    report = qat.export(model, tmp_path / "e", batches=digits.val, task="classification")
    assert report.verification["top1_agreement"] == 1.0
    runtime = qat.load_quantized(tmp_path / "e", DigitsCNN())  # the skeleton's BatchNorms become identities
    assert isinstance(runtime.bn1, torch.nn.Identity)
    with torch.no_grad():
        x = digits.val[0][0]
        assert float((runtime(x) - model(x)).abs().max()) <= 1e-3 * float(model(x).abs().max())
    # The oracle drops the BatchNorm the export names in ``folded_bn`` by itself.
    assert_matches_oracle(tmp_path / "e", DigitsCNN, [x], runtime=runtime, fake_quant=model)
