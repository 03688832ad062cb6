"""Interrupted runs resume exactly: kill a run at a given step (in-process, SIGKILL, SIGTERM), continue it
with ``resume=true``, and get the uninterrupted run's metrics.json figures to within 1e-6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _faults import Killed
from helpers.configs import compose_cfg
from helpers.probes import record_train_starts, train_starts

from qat.runs import latest_checkpoint as find_resume_checkpoint
from qat.train.job import JobConfigError, run

HERE = Path(__file__).resolve().parent
# Two float and two QAT epochs of 5 steps, last.ckpt every 2 steps; QAT starts with 4 float warm-up steps
# and freezes observers from step 4. w8a8 uses LSQ weights and EMA activation observers.
BASE = [
    "debug=fast", "export.enabled=false", "logger=none", "callbacks=none", "quant=w8a8",
    "baseline.max_epochs=2", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "data.batch_size=32",
    "checkpoint.every_n_train_steps=2", "schedule.float_warmup_steps=4", "schedule.freeze_observers_step=4",
]  # fmt: skip
TOL = 1e-6


def kill_at(phase: str, step: int, how: str = "raise") -> list[str]:
    return [
        "+callbacks.kill._target_=_faults.KillAt",
        f"+callbacks.kill.phase={phase}",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.how={how}",
    ]


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the baseline and quantized test metrics (inf if keys differ)."""
    diffs = []
    for part in ("baseline", "quantized"):
        if a[part].keys() != b[part].keys():
            return float("inf")
        diffs += [abs(a[part][k] - b[part][k]) for k in a[part]]
    return max(diffs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every resumed run must reproduce."""
    return run(compose_cfg(BASE, tmp_path_factory.mktemp("reference")))


def observer_flags(path: Path) -> list[int]:
    """``observer_enabled`` of every quantizer that has an observer (learned scales have none to freeze)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    flags = [k for k in sd if k.endswith("observer_enabled")]
    return [int(sd[k]) for k in flags if k.replace("observer_enabled", "observer.min_val") in sd]


@pytest.mark.parametrize(
    "phase,step,resumes_from",
    [
        # before the first checkpoint: resume=true starts the run afresh
        pytest.param("float", 1, None, marks=pytest.mark.slow),
        # float phase, mid-epoch (epoch 1, one batch done)
        pytest.param("float", 7, ("float", 6), marks=pytest.mark.slow),
        # QAT during the schedule's float warm-up (fake quant still off)
        pytest.param("qat", 3, ("qat", 2), marks=pytest.mark.slow),
        # QAT after the observers froze (step 4), mid-epoch
        ("qat", 7, ("qat", 6)),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path, reference, phase, step, resumes_from):
    with pytest.raises(Killed):
        run(compose_cfg(BASE + kill_at(phase, step), tmp_path))
    found = find_resume_checkpoint(tmp_path)
    if resumes_from is None:
        assert found is None
    else:
        assert found is not None and found.parent.name == resumes_from[0]
        assert torch.load(found, map_location="cpu", weights_only=True)["global_step"] == resumes_from[1]
    if resumes_from == ("qat", 6):  # the frozen schedule state is in the checkpoint ...
        assert observer_flags(found) == [0, 0, 0, 0]
    starts = tmp_path / "train_starts.jsonl"
    resumed = run(compose_cfg([*BASE, "resume=true", *record_train_starts(starts)], tmp_path))
    # It continued from the checkpoint (a fresh run is seeded, so its metrics alone would not tell): the
    # phase it resumed began training at the checkpoint's step, and a QAT checkpoint's float phase was not
    # trained again.
    if resumes_from is None:
        expected = [("float", 0), ("qat", 0)]  # no checkpoint yet: a fresh run
    elif resumes_from[0] == "float":
        expected = [resumes_from, ("qat", 0)]
    else:
        expected = [resumes_from]
    assert train_starts(starts) == expected
    assert max_diff(resumed, reference) <= TOL, (resumed["quantized"], reference["quantized"])
    # ... and stays frozen: a resume must not re-enable observers.
    assert observer_flags(tmp_path / "checkpoints" / "qat" / "last.ckpt") == [0, 0, 0, 0]
    assert json.loads((tmp_path / "metrics.json").read_text())["quantized"] == resumed["quantized"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_sigkill_loses_nothing_that_was_saved(tmp_path, reference):
    """Real signals through ``qat-train``: SIGTERM at QAT step 5 (not a checkpoint step) saves exactly that
    step and exits 143; the resumed run is SIGKILLed at step 7; a second resume finishes the run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "qat.cli.train", *BASE, f"hydra.run.dir={tmp_path}"]
    term = subprocess.run(
        [*cli, *kill_at("qat", 5, "sigterm")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert term.returncode == 143, term.stderr[-3000:]
    assert "interrupted by SIGTERM" in term.stderr and "resume=true" in term.stderr
    ckpt = tmp_path / "checkpoints" / "qat" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 5
    assert not (tmp_path / "metrics.json").exists()

    kill = subprocess.run(
        [*cli, "resume=true", *kill_at("qat", 7, "sigkill")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert kill.returncode == -9, kill.stderr[-3000:]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 6

    resumed = run(compose_cfg([*BASE, "resume=true"], tmp_path))
    assert max_diff(resumed, reference) <= TOL


@pytest.mark.slow
def test_resume_of_a_finished_run_only_re_evaluates(tmp_path, reference):
    first = run(compose_cfg(BASE, tmp_path))
    mtime = (tmp_path / "checkpoints" / "qat" / "last.ckpt").stat().st_mtime_ns
    again = run(compose_cfg([*BASE, "resume=true"], tmp_path))
    assert max_diff(first, again) == 0.0 and max_diff(first, reference) <= TOL
    assert (tmp_path / "checkpoints" / "qat" / "last.ckpt").stat().st_mtime_ns == mtime  # no training


def test_ckpt_path_that_does_not_exist_fails_before_training(tmp_path):
    with pytest.raises(JobConfigError, match=r"^ckpt_path: '.*nope.ckpt' does not exist; allowed: "):
        run(compose_cfg([*BASE, f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_kill_during_the_final_export_then_resume_finishes(tmp_path, reference, monkeypatch):
    """Killed while the export is being written (after training and testing): no export directory appears,
    and the resumed run skips training, writes the export and the same metrics."""
    import qat.io
    from qat.deploy import load_quantized
    from qat.models import DigitsCNN

    def die(tmp: Path, out: Path) -> None:
        raise Killed("killed while exporting")

    monkeypatch.setattr(qat.io, "replace_directory", die)
    monkeypatch.setattr(qat.io.shutil, "rmtree", lambda *a, **k: None)  # SIGKILL cleans nothing up
    with_export = [o for o in BASE if o != "export.enabled=false"]
    with pytest.raises(Killed):
        run(compose_cfg(with_export, tmp_path))
    monkeypatch.undo()
    assert not (tmp_path / "export").exists() and not (tmp_path / "metrics.json").exists()
    assert [p.name for p in tmp_path.glob(".export.tmp-*")]  # the half-done export stayed hidden
    mtime = (tmp_path / "checkpoints" / "qat" / "last.ckpt").stat().st_mtime_ns

    resumed = run(compose_cfg([*with_export, "resume=true"], tmp_path))
    assert (tmp_path / "checkpoints" / "qat" / "last.ckpt").stat().st_mtime_ns == mtime  # no training
    assert max_diff(resumed, reference) <= TOL
    assert resumed["export"]["verification"]["weights_bit_exact"] is True
    load_quantized(tmp_path / "export", DigitsCNN())  # a complete, loadable export
