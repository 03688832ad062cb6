"""The non-finite loss guard stops a diverging run with one message naming the step and the last good
checkpoint, and never lets a poisoned state reach a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.configs import compose_cfg

from qat.train.guards import NonFiniteLossGuard
from qat.train.job import JobConfigError, run
from qat.train.module import NonFiniteLossError

HERE = Path(__file__).resolve().parent
# No float training (the model as built), 2 QAT epochs of 5 steps.
BASE = [
    "debug=fast", "export.enabled=false", "logger=none", "callbacks=none", "quant=w8a8",
    "baseline.max_epochs=0", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=32",
]  # fmt: skip


def poison_at(step: int, when: str = "start", value: str = "nan") -> list[str]:
    return [
        "+callbacks.poison._target_=_faults.PoisonAt",
        f"+callbacks.poison.step={step}",
        f"+callbacks.poison.when={when}",
        f"+callbacks.poison.value={value}",
    ]


def saved_step_and_finite(path: Path) -> tuple[int, bool]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    finite = all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    return int(ckpt["global_step"]), bool(finite)


def test_nan_loss_stops_before_the_next_checkpoint_and_names_the_last_good_one(tmp_path):
    cfg = compose_cfg([*BASE, "checkpoint.every_n_train_steps=2", *poison_at(3)], tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg)
    ckpt = tmp_path / "checkpoints" / "qat" / "last.ckpt"
    msg = str(info.value)
    assert msg.startswith("training stopped: the training loss became non-finite (nan) at step 3; ")
    assert f"last good checkpoint: {ckpt} (step 2)" in msg and "\n" not in msg
    assert saved_step_and_finite(ckpt) == (2, True)  # the step-4 save was refused
    assert not (tmp_path / "metrics.json").exists()


def test_flag_is_read_every_n_steps_and_reports_the_first_bad_step(tmp_path):
    overrides = ["checkpoint.every_n_train_steps=0", "checkpoint.nonfinite_check_every_n_steps=4"]
    with pytest.raises(NonFiniteLossError) as info:
        run(compose_cfg([*BASE, *overrides, *poison_at(1, value="inf")], tmp_path))
    msg = str(info.value)
    assert "non-finite (nan) at step 1 (seen at step 4); no checkpoint was saved in this phase" in msg
    assert not (tmp_path / "checkpoints" / "qat").exists()


def test_finite_loss_with_non_finite_weights_is_not_checkpointed(tmp_path):
    cfg = compose_cfg([*BASE, "checkpoint.every_n_train_steps=2", *poison_at(3, when="end")], tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"^training stopped at step 4: \d+ parameters/buffers "):
        run(cfg)
    assert saved_step_and_finite(tmp_path / "checkpoints" / "qat" / "last.ckpt") == (2, True)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_check_interval_is_refused(value):
    with pytest.raises(ValueError, match="check_every_n_steps: .* is not valid; allowed: an integer >= 1"):
        NonFiniteLossGuard(check_every_n_steps=value)


def test_bad_check_interval_in_the_config_fails_before_training(tmp_path):
    with pytest.raises(JobConfigError, match=r"^checkpoint.nonfinite_check_every_n_steps: 0 is not valid"):
        run(compose_cfg([*BASE, "checkpoint.nonfinite_check_every_n_steps=0"], tmp_path))


@pytest.mark.slow
def test_cli_reports_a_diverged_run_in_one_line(tmp_path):
    cmd = [
        sys.executable, "-m", "qat.cli.train", *BASE, "checkpoint.every_n_train_steps=2", *poison_at(3),
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "non-finite (nan) at step 3" in lines[0] and "(step 2)" in lines[0]
    assert "Traceback" not in proc.stderr
