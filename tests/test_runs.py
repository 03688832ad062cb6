"""The run-directory layout has one home (qat.runs), and it imports no training code."""

from __future__ import annotations

import subprocess
import sys

from qat import runs


def test_checkpoints_know_their_phase_and_run(tmp_path):
    run = tmp_path / "run"
    for phase in runs.PHASES:
        ckpt = runs.checkpoint_file(run, phase)
        assert runs.phase_of(ckpt) == phase and runs.run_of(ckpt) == run.resolve()
    assert runs.phase_of(tmp_path / "elsewhere.ckpt") == "qat" and runs.phase_of(None) is None


def test_the_latest_checkpoint_is_the_last_phase_that_has_one(tmp_path):
    assert runs.latest_checkpoint(tmp_path) is None
    for phase in runs.PHASES:  # in the order a run writes them
        path = runs.checkpoint_file(tmp_path, phase)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        assert runs.latest_checkpoint(tmp_path) == path


def test_qat_export_and_the_layout_load_no_lightning():
    """``qat-export --help`` and ``qat-report`` stay quick: no Lightning, no training code on import."""
    code = (
        "import sys, qat.runs, qat.cli.export, qat.cli.eval, qat.report\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')"
        " or m.startswith('qat.train')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
