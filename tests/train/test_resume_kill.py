"""A real SIGKILL in the default run: ``qat-train`` is killed mid-QAT (no handler runs, nothing is flushed),
and ``resume=true`` continues from the checkpoint it left to the uninterrupted run's metrics.

The small sibling of tests/train/test_resume.py's slow signal tests: one float epoch and one QAT epoch of 4
steps, a checkpoint every 2 steps, killed at QAT step 3 (after the step-2 checkpoint, before any other).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers.configs import compose_cfg
from helpers.probes import record_train_starts, train_starts

from qat.train.job import run

HERE = Path(__file__).resolve().parent
BASE = [
    "debug=fast", "export.enabled=false", "logger=none", "callbacks=none", "quant=w8a8",
    "baseline.max_epochs=1", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=16",
    "calibration.batches=1", "checkpoint.every_n_train_steps=2",
]  # fmt: skip
SIGKILL_AT_QAT_STEP_3 = [
    "+callbacks.kill._target_=_faults.KillAt",
    "+callbacks.kill.phase=qat",
    "+callbacks.kill.step=3",
    "+callbacks.kill.how=sigkill",
]


def test_sigkilled_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(
        [sys.executable, "-m", "qat.cli.train", *BASE, *SIGKILL_AT_QAT_STEP_3, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "qat" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    assert not (run_dir / "metrics.json").exists()

    starts = tmp_path / "train_starts.jsonl"
    resumed = run(compose_cfg([*BASE, "resume=true", *record_train_starts(starts)], run_dir))
    assert train_starts(starts) == [("qat", 2)]  # continued from the checkpoint; the float phase not redone
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4

    reference = run(compose_cfg(BASE, tmp_path / "reference"))
    for part in ("baseline", "quantized"):
        assert resumed[part].keys() == reference[part].keys()
        for key, value in reference[part].items():
            assert abs(resumed[part][key] - value) <= 1e-6, (part, key, resumed[part][key], value)
