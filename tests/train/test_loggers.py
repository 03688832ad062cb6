"""Every logger config builds from the run config and writes where the run directory says (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.extras import require

from qat.train.job import build_trainer


def test_csv_logger_is_the_default_and_one_file_per_phase(make_cfg):
    cfg = make_cfg()
    out = Path(cfg.paths.output_dir)
    for phase in ("float", "qat"):
        trainer = build_trainer(cfg, phase, out, [])
        (logger,) = trainer.loggers
        logger.log_metrics({"quant/w_clip_mean": 0.25}, step=3)
        logger.save()
        assert (out / "logs" / phase / "metrics.csv").read_text().splitlines()[1].startswith("0.25,3")


def test_tensorboard_logger_writes_events(make_cfg):
    require("tensorboard", extra="loggers")
    cfg = make_cfg("logger=tensorboard")
    out = Path(cfg.paths.output_dir)
    (logger,) = build_trainer(cfg, "qat", out, []).loggers
    logger.log_metrics({"quant/w_clip_mean": 0.25}, step=3)
    logger.finalize("success")
    assert list((out / "logs" / "qat").glob("events.out.tfevents.*"))


def test_no_logger(make_cfg):
    cfg = make_cfg("logger=none")
    assert build_trainer(cfg, "qat", Path(cfg.paths.output_dir), []).loggers == []


@pytest.mark.slow  # MLflow creates and migrates its SQLite store on first use (~10 s)
def test_mlflow_logger_uses_a_local_sqlite_store(make_cfg):
    for module in ("mlflow", "sqlalchemy", "alembic"):
        require(module, extra="loggers")
    from mlflow.tracking import MlflowClient

    cfg = make_cfg("logger=mlflow")
    out = Path(cfg.paths.output_dir)
    (logger,) = build_trainer(cfg, "qat", out, []).loggers
    logger.log_metrics({"quant/w_clip_mean": 0.25}, step=3)
    logger.finalize("success")
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "qat" and run.data.metrics["quant/w_clip_mean"] == 0.25
    assert client.get_experiment_by_name("qat").artifact_location.endswith("mlartifacts")
