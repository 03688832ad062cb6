"""An installed wheel carries its configs and recipes: ``qat-train debug=fast`` runs from an empty directory.

Offline: the wheel is built without build isolation, and the fresh virtual environment sees this
environment's packages (torch, Lightning, Hydra, ...) through a ``.pth`` file instead of installing them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
    return proc


@pytest.mark.slow  # a wheel, a virtual environment and a short training run: about a minute
def test_an_installed_wheel_trains_from_an_empty_directory(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "qat", src / "qat", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    _run([*pip, "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", "dist", "./src"], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("qatkit-*.whl")
    _run([sys.executable, "-m", "venv", "venv"], tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "-q", "install", "--no-deps", "--no-index", str(wheel)], tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(python), "-c", "import qat.conf; print(qat.conf.CONFIG_DIR)"], empty).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv")  # the installed copy, not this checkout
    assert (Path(where) / "recipe" / "digits_w4a4.yaml").is_file()
    _run([str(tmp_path / "venv" / "bin" / "qat-train"), "debug=fast"], empty)
    assert list((empty / "outputs" / "digits_w4a4").glob("*/metrics.json"))
