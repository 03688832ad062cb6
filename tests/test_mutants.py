"""Every mutant of ``scripts/mutants.py`` is caught by the default suite (about 5 minutes on 2 cores, hence
slow). The script works on a temporary copy of the repository; this checkout is never modified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_mutant_is_caught_by_the_default_suite():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mutants.py")],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    summary = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, summary
    assert " 0 survived, 0 errors" in proc.stdout, summary
