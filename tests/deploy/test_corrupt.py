"""Loading fails with a clear ExportFormatError on anything that is not a complete, matching export."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.export_models import quant_cfg, quantize
from safetensors.torch import load_file, save_file

import qat
from qat.deploy import ExportFormatError, schema
from qat.models import MLP, DigitsCNN


@pytest.fixture(scope="module")
def model(digits, digits_float) -> torch.nn.Module:
    return quantize(digits_float, quant_cfg("w4a4"), digits, qat_steps=0)


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corrupt") / "export"
    qat.export(model, out)
    return out


@pytest.fixture
def copy_dir(export_dir, tmp_path) -> Path:
    dst = tmp_path / "e"
    shutil.copytree(export_dir, dst)
    return dst


def _load(d: Path) -> torch.nn.Module:
    return qat.load_quantized(d, DigitsCNN())


def _rewrite_weights(d: Path, tensors: dict) -> None:
    """Replace model.safetensors and record its new size and hash, so only the content is wrong."""
    import hashlib

    save_file(tensors, d / schema.WEIGHTS_FILE)
    cfg = json.loads((d / schema.CONFIG_FILE).read_text())
    data = (d / schema.WEIGHTS_FILE).read_bytes()
    cfg["files"]["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / schema.CONFIG_FILE).write_text(json.dumps(cfg))


def test_intact_copy_loads(copy_dir, model, digits):
    """The control for every test below: an undamaged copy loads and computes what the exported model
    computes, bit for bit."""
    loaded = _load(copy_dir)
    with torch.no_grad():
        for x, _ in digits.val[:2]:
            assert torch.equal(loaded(x), model(x))


def test_truncated_weights(copy_dir):
    p = copy_dir / schema.WEIGHTS_FILE
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ExportFormatError, match="truncated"):
        _load(copy_dir)


def test_truncated_weights_without_recorded_size(copy_dir):
    cfg = json.loads((copy_dir / schema.CONFIG_FILE).read_text())
    cfg["files"]["weights"] = {"path": schema.WEIGHTS_FILE}  # another producer may not record size/hash
    (copy_dir / schema.CONFIG_FILE).write_text(json.dumps(cfg))
    p = copy_dir / schema.WEIGHTS_FILE
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        _load(copy_dir)
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[: 8 + n // 2])
    with pytest.raises(ExportFormatError, match="truncated"):
        _load(copy_dir)


def test_flipped_byte_is_caught_by_checksum(copy_dir):
    p = copy_dir / schema.WEIGHTS_FILE
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match="sha256"):
        _load(copy_dir)


def test_corrupt_or_missing_config(copy_dir):
    p = copy_dir / schema.CONFIG_FILE
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
    with pytest.raises(ExportFormatError, match="not valid JSON"):
        _load(copy_dir)
    p.unlink()
    with pytest.raises(ExportFormatError, match="missing"):
        _load(copy_dir)


@pytest.mark.parametrize("version", [0, 3, 99])
def test_unknown_schema_version(copy_dir, version):
    p = copy_dir / schema.CONFIG_FILE
    cfg = json.loads(p.read_text())
    cfg["schema_version"] = version
    p.write_text(json.dumps(cfg))
    with pytest.raises(ExportFormatError, match=f"schema_version {version} is not supported"):
        _load(copy_dir)


def test_wrong_schema_name_and_structure(copy_dir):
    p = copy_dir / schema.CONFIG_FILE
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps({**cfg, "schema": "something.else"}))
    with pytest.raises(ExportFormatError, match="expected 'qatkit.quant_config'"):
        _load(copy_dir)
    bad = json.loads(json.dumps(cfg))
    bad["layers"]["conv2"]["weight"]["kind"] = "int5"
    p.write_text(json.dumps(bad))
    with pytest.raises(ExportFormatError, match=r"layers\['conv2'\].weight: kind 'int5'"):
        _load(copy_dir)


def test_tensor_shape_mismatch(copy_dir):
    tensors = load_file(copy_dir / schema.WEIGHTS_FILE)
    tensors["conv2.weight.scale"] = torch.ones(31)
    _rewrite_weights(copy_dir, tensors)
    with pytest.raises(
        ExportFormatError, match=r"'conv2.weight.scale' is F32\[31\] but .* expects F32\[32\]"
    ):
        _load(copy_dir)


def test_tensor_dtype_mismatch(copy_dir):
    tensors = load_file(copy_dir / schema.WEIGHTS_FILE)
    tensors["conv2.weight.codes"] = tensors["conv2.weight.codes"].to(torch.int8)
    _rewrite_weights(copy_dir, tensors)
    with pytest.raises(ExportFormatError, match="'conv2.weight.codes' is I8"):
        _load(copy_dir)


def test_missing_and_extra_tensors(copy_dir):
    tensors = load_file(copy_dir / schema.WEIGHTS_FILE)
    scale = tensors.pop("fc.weight.scale")
    _rewrite_weights(copy_dir, tensors)
    with pytest.raises(ExportFormatError, match="'fc.weight.scale' named in quant_config.json is missing"):
        _load(copy_dir)
    tensors["fc.weight.scale"] = scale
    tensors["stray"] = torch.zeros(3)
    _rewrite_weights(copy_dir, tensors)
    with pytest.raises(ExportFormatError, match="'stray' is not described"):
        _load(copy_dir)


def test_codes_outside_the_format_range(copy_dir):
    cfg = json.loads((copy_dir / schema.CONFIG_FILE).read_text())
    cfg["layers"]["conv2"]["weight"]["qmax"] = 3  # the stored int4 codes reach 7
    (copy_dir / schema.CONFIG_FILE).write_text(json.dumps(cfg))
    # Re-save the weights without qatkit's config digest (as another producer would), so the range check
    # itself is reached rather than the digest mismatch.
    _rewrite_weights(copy_dir, load_file(copy_dir / schema.WEIGHTS_FILE))
    with pytest.raises(ExportFormatError, match="outside the format's"):
        _load(copy_dir)


def test_wrong_skeleton(copy_dir):
    with pytest.raises(ExportFormatError, match="no module 'conv1'"):
        qat.load_quantized(copy_dir, MLP())
    with pytest.raises(ExportFormatError, match="weight shape .* does not match"):
        qat.load_quantized(copy_dir, DigitsCNN(channels=(16, 16)))


def test_loading_never_unpickles(copy_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _load(copy_dir)
