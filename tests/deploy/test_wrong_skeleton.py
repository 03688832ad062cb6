"""``load_quantized`` into a skeleton that does not match the export fails with one ExportFormatError and
leaves the skeleton exactly as it was: same module objects, same tensors (nothing half-converted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.export_models import quant_cfg, quantize
from torch import nn

import qat
from qat.deploy import ExportFormatError
from qat.models import DigitsCNN


@pytest.fixture(scope="module")
def export_dir(digits, digits_float, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skeleton") / "export"
    qat.export(quantize(digits_float, quant_cfg("w4a4"), digits, qat_steps=0), out)
    return out


def head_of_another_size() -> nn.Module:
    return DigitsCNN(num_classes=5)  # conv1..conv3 match, fc does not: the convs come first


def prepared_with_head_of_another_size() -> nn.Module:
    return qat.prepare(DigitsCNN(num_classes=5), quant_cfg("w4a4"))  # would be un-prepared first


def one_float_layer_more() -> nn.Module:
    model = DigitsCNN()  # every quantized layer matches; the check of the float tensors fails at the end
    model.extra = nn.LayerNorm(4)
    return model


@pytest.mark.parametrize(
    "make,message",
    [
        (head_of_another_size, "weight shape .* does not match"),
        (prepared_with_head_of_another_size, "weight shape .* does not match"),
        (one_float_layer_more, "the model expects 'extra.bias'"),
    ],
)
def test_a_wrong_skeleton_is_left_untouched(export_dir, make, message):
    skeleton = make()
    modules = dict(skeleton.named_modules())
    state = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ExportFormatError, match=message):
        qat.load_quantized(export_dir, skeleton)
    after = dict(skeleton.named_modules())
    assert list(after) == list(modules)
    assert all(after[n] is m for n, m in modules.items()), "a module of the skeleton was replaced"
    now = skeleton.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items()), "a tensor of the skeleton changed"


def test_a_matching_skeleton_is_converted_in_place(export_dir):
    skeleton = DigitsCNN()
    runtime = qat.load_quantized(export_dir, skeleton)
    assert runtime is skeleton and type(skeleton.fc).__name__ == "IntLinear"
