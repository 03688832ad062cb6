"""Hand-made run directories in the layout qat-train writes, so report tests need no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def _quant(w_fmt: str | None, a_fmt: str | None, scale: str = "lsq") -> dict:
    side = lambda f: None if f is None else {"format": f, "granularity": "per_tensor", "scale": scale}  # noqa: E731
    return {"name": "custom", "weight": side(w_fmt), "activation": side(a_fmt), "overrides": {}}


def write_run(
    path: Path,
    *,
    status: str = "ok",
    w_fmt: str | None = "int4",
    a_fmt: str | None = "int8",
    mode: str = "qat",
    value: float = 0.9,
    baseline: float = 0.95,
    size: int = 1000,
    float_size: int = 8000,
    metric: str = "acc",
    curve: list[tuple[int, float]] | None = None,
    export_bytes: int | None = None,
    latency_ms: float | None = None,
    scale: str = "lsq",
    model: str = "cnn",
) -> Path:
    """A run directory: .hydra/config.yaml always; metrics.json unless status == 'running'."""
    config = {
        "task": "classification" if metric == "acc" else "lm",
        "mode": mode,
        "model": {"_target_": model},
        "quant": _quant(w_fmt, a_fmt, scale),
    }
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if status != "running":
        metrics = {
            "primary_metric": metric,
            "higher_is_better": metric == "acc",
            "baseline": {metric: baseline, "loss": 0.1},
            "quantized": {metric: value, "loss": 0.2},
            "size_bytes": {"baseline": float_size, "quantized": size},
            "mode": mode if w_fmt or a_fmt else "float",
            "quant": f"w{w_fmt}a{a_fmt}",
            "wall_time_s": 1.5,
            "config": config,
        }
        if status == "failed":
            metrics = {"status": "failed", "error": "ValueError: boom", "config": config, "quant": "bad"}
        (path / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        (path / "logs" / "qat").mkdir(parents=True)
        lines = ["epoch,step,train/loss,val/loss,val/" + metric]
        lines += [f"0,{s},0.5,," for s, _ in curve]
        lines += [f"0,{s},,0.3,{v}" for s, v in curve]
        (path / "logs" / "qat" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if export_bytes is not None:
        (path / "export").mkdir()
        (path / "export" / "export_report.json").write_text(
            json.dumps(
                {
                    "exported_bytes": export_bytes,
                    "file_bytes": export_bytes + 100,  # the safetensors header
                    "float_bytes": float_size,
                    "ratio": float_size / export_bytes,
                }
            )
        )
    if latency_ms is not None:
        (path / "eval.json").write_text(json.dumps({"latency_ms": latency_ms}))
    return path


@pytest.fixture
def make_run():
    """The :func:`write_run` helper, as a fixture (test modules do not import conftest)."""
    return write_run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A Hydra-style sweep: two finished runs, one failed, one still running (numbered 0, 1, 2, 10)."""
    root = tmp_path / "sweep"
    write_run(
        root / "0_debug=fast,quant=w8a8", w_fmt="int8", value=0.94, size=2500, curve=[(9, 0.9), (19, 0.93)]
    )
    write_run(
        root / "1_debug=fast,quant=w4a4",
        w_fmt="int4",
        a_fmt="int4",
        value=0.91,
        size=1500,
        curve=[(9, 0.85), (19, 0.9)],
        export_bytes=1400,
        latency_ms=2.5,
    )
    write_run(root / "2_debug=fast,quant=w4g7", status="failed")
    write_run(
        root / "10_debug=fast,quant=w2a2", status="running", w_fmt="int2", a_fmt="int2", curve=[(9, 0.5)]
    )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root
