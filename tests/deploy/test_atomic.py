"""The export directory appears complete or not at all; a failed re-export keeps the previous one."""

from __future__ import annotations

import json
import re

import pytest
from helpers.export_models import quant_cfg, quantize

import qat
from qat.deploy import ExportError, VerificationError, exporter, schema


@pytest.fixture(scope="module")
def model(digits, digits_float):
    return quantize(digits_float, quant_cfg("w4a8"), digits, qat_steps=0)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("stage", ["weights", "json"])
def test_failure_mid_export_leaves_nothing(model, tmp_path, monkeypatch, stage):
    out = tmp_path / "export"
    real_weights, real_json = exporter.write_safetensors, exporter.write_json_atomic

    def boom_weights(path, tensors, *rest):
        real_weights(path, tensors, *rest)  # the file is on disk, then the process "dies"
        raise OSError("disk full")

    def boom_json(path, obj):
        real_json(path, obj)
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "write_safetensors" if stage == "weights" else "write_json_atomic",
                        boom_weights if stage == "weights" else boom_json)  # fmt: skip
    with pytest.raises(ExportError, match=re.escape(f"{out}: cannot write the export there (disk full)")):
        qat.export(model, out)
    assert not out.exists()
    assert _siblings(out) == []  # no temporary directory left behind


def test_failed_reexport_keeps_previous_export(model, digits, tmp_path, monkeypatch):
    out = tmp_path / "export"
    qat.export(model, out, batches=digits.val, task="classification")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def bad_compare(*args, **kwargs):
        return {"items": 1, "top1_agreement": 0.5, "max_abs_logit_diff": 1.0, "logit_range": 1.0,
                "max_rel_logit_diff": 1.0, "batches": 1}  # fmt: skip

    monkeypatch.setattr(exporter, "compare", bad_compare)
    with pytest.raises(VerificationError, match="top-1 agreement 50.00%"):
        qat.export(model, out, batches=digits.val, task="classification")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == ["export"]


def test_reexport_replaces_and_overwrite_false_refuses(model, digits, tmp_path):
    out = tmp_path / "export"
    qat.export(model, out)
    assert json.loads((out / schema.REPORT_FILE).read_text())["verification"] is None
    qat.export(model, out, batches=digits.val, task="classification")
    assert json.loads((out / schema.REPORT_FILE).read_text())["verification"]["passed"]
    assert _siblings(out) == ["export"]
    with pytest.raises(FileExistsError):
        qat.export(model, out, overwrite=False)


def test_export_of_an_unprepared_model_is_refused(digits_float, tmp_path):
    with pytest.raises(exporter.ExportError, match="no active quantizer"):
        qat.export(digits_float, tmp_path / "e")
    assert not (tmp_path / "e").exists()
