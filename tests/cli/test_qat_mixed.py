"""``qat-mixed`` end to end on digits (tiny limits): writes a quant config that ``qat-train`` runs with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from qat.cli.mixed import run as run_mixed
from qat.cli.train import CONFIG_DIR
from qat.config import QuantConfigError
from qat.train.job import run as run_train

TINY = ("debug=fast", "logger=none", "trainer.limit_train_batches=1", "trainer.limit_test_batches=1")


def _mixed_cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("mixed", overrides=[*overrides, *TINY, "mixed.batches=1", f"paths.output_dir={out}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.mark.slow  # two Lightning runs: ~10 s on an idle machine, more on a shared one
def test_qat_mixed_writes_a_config_that_qat_train_uses(tmp_path, make_cfg) -> None:
    out = tmp_path / "mixed"
    report = run_mixed(_mixed_cfg(out, "recipe=digits_w4a4", "budget.bits_per_weight=3"))
    path = Path(report["config_path"])
    assert path == out / "quant" / "mixed_w3.yaml" and path.exists()
    assert report["achieved_bits_per_weight"] <= 3.0 and set(report["pinned"]) == {"conv1", "fc"}
    assert json.loads((out / "quant" / "mixed_w3_report.json").read_text())["bits"] == report["bits"]
    assert (out / "checkpoints" / "float" / "last.ckpt").exists()  # reusable as baseline.ckpt
    cfg = make_cfg(
        "recipe=digits_w4a4",
        f"hydra.searchpath=[file://{out}]",
        "quant=mixed_w3",
        *TINY,
        "export.enabled=false",
        f"baseline.ckpt={out / 'checkpoints' / 'float' / 'last.ckpt'}",
        "baseline.max_epochs=0",
    )
    metrics = run_train(cfg)
    assert metrics["quant"] == "mixed_w3"
    formats = {k: v["weight"]["format"] for k, v in metrics["config"]["quant"]["overrides"].items()}
    assert {formats[n] for n in report["bits"]} <= {"int2", "int3", "int4", "int8"}


def test_qat_mixed_rejects_a_float_config(tmp_path) -> None:
    with pytest.raises(QuantConfigError, match="quant: fp32 is not valid for qat-mixed"):
        run_mixed(_mixed_cfg(tmp_path / "m", "quant=fp32"))
