"""``qat-export`` and ``qat-eval`` on a run directory laid out as ``qat-train`` writes it."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import qat
from qat.cli import eval as eval_cli
from qat.cli import export as export_cli
from qat.train.job import quant_config


def make_run(path, make_cfg, digits_float, digits, recipe="digits_w4a4"):
    cfg = make_cfg(f"recipe={recipe}", sub=path.name)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    model = instantiate(cfg.model)
    model.load_state_dict(digits_float.state_dict())
    for phase in ("float", "qat"):
        if phase == "qat":
            qat.prepare(model, quant_config(cfg))
            qat.calibrate(model, digits.cal)
        ckpt = path / "checkpoints" / phase / "last.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return model.eval()


@pytest.mark.parametrize("fmt", ["native", pytest.param("onnx", marks=pytest.mark.slow)])
def test_qat_export_and_qat_eval(fmt, make_cfg, digits_float, digits, tmp_path, capsys):
    run = tmp_path / "run"
    model = make_run(run, make_cfg, digits_float, digits)
    export_cli.main([f"run_dir={run}", f"target={fmt}"])
    out = capsys.readouterr().out
    assert "verification: top-1 agreement 100.00%" in out and ("onnx:" in out) is (fmt == "onnx")
    report = json.loads((run / "export" / "export_report.json").read_text())
    assert report["verification"]["passed"] and (report["onnx"] is not None) is (fmt == "onnx")
    reloaded = qat.load_quantized(run / "export", instantiate(OmegaConf.load(run / "config.yaml").model))
    x = digits.val[0][0]
    with torch.no_grad():
        assert bool((reloaded(x).argmax(1) == model(x).argmax(1)).all())

    eval_cli.main([f"run_dir={run}", "repeats=2", "warmup=1", "batch_sizes=[1,8]", "max_batches=2"])
    out = capsys.readouterr().out
    rows = ["float", "fake-quant", "integer (export)"] + (["onnx (onnxruntime)"] if fmt == "onnx" else [])
    assert all(row in out for row in rows)
    result = json.loads((run / "eval.json").read_text())
    by_name = {r["name"]: r for r in result["rows"]}
    assert list(by_name) == rows
    assert result["metric"] == "acc" and set(by_name["float"]["latency_ms"]) == {"1", "8"}
    assert by_name["integer (export)"]["size_bytes"] < by_name["float"]["size_bytes"]
    assert by_name["float"]["notes"] == "float baseline"


def test_qat_export_from_checkpoint_path(make_cfg, digits_float, digits, tmp_path):
    run = tmp_path / "run"
    make_run(run, make_cfg, digits_float, digits, recipe="digits_w8a8")
    export_cli.main(
        [f"ckpt={run / 'checkpoints' / 'qat' / 'last.ckpt'}", f"out={tmp_path / 'x'}", "verify=false"]
    )
    assert (tmp_path / "x" / "model.safetensors").exists()
    assert json.loads((tmp_path / "x" / "export_report.json").read_text())["verification"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["target=tflite"], "target: 'tflite' is not valid; allowed: native, onnx"),
        (["target=[onnx,tflite]"], "target: 'tflite' is not valid; allowed: native, onnx"),
        (["bogus=1"], "bogus: unknown field; allowed: run_dir, ckpt, out, target, verify, max_batches"),
        (["split=train"], "split: 'train' is not valid; allowed: validation, test"),
        ([], "run_dir: missing"),
        (["run_dir=/nonexistent/run"], "has no config.yaml"),
        (["run_dir=x", "verify=maybe"], "verify: 'maybe' is not valid; allowed: true, false"),
    ],
)
def test_bad_arguments_exit_1_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
