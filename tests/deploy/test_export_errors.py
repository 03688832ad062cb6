"""An export that cannot be written names the user's path (never the temporary directory it is written to
first); ``qat-export`` and ``qat-eval`` say so in one line and exit 1, and print the traceback only with
``verbose=true``."""

from __future__ import annotations

import pytest
from helpers.export_models import quant_cfg, quantize
from test_cli import make_run

import qat
import qat.io
from qat.cli import eval as eval_cli
from qat.cli import export as export_cli
from qat.deploy import ExportError


@pytest.fixture(scope="module")
def model(digits, digits_float):
    return quantize(digits_float, quant_cfg("w8a8"), digits, qat_steps=0)


@pytest.fixture
def under_a_file(tmp_path):
    """A path whose parent is a regular file: unwritable for every user, root included."""
    (tmp_path / "notes.txt").write_text("a file, not a directory\n")
    return tmp_path / "notes.txt" / "export"


def test_api_names_the_target_when_its_parent_is_a_file(model, under_a_file):
    out = under_a_file
    with pytest.raises(ExportError) as e:
        qat.export(model, out)
    why = f"{out.parent} is a file, not a directory"
    allowed = "a path in a writable directory"
    assert str(e.value) == f"{out}: cannot write the export there ({why}); allowed: {allowed}"


def test_api_names_the_target_in_a_read_only_directory(model, tmp_path, monkeypatch):
    """A read-only parent (simulated: root may write anyway): the error names the target, not the
    temporary sibling the export is first written to."""
    out = tmp_path / "ro" / "export"

    def read_only(prefix: str = "", dir: str = "") -> str:
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc123")

    monkeypatch.setattr(qat.io.tempfile, "mkdtemp", read_only)
    with pytest.raises(ExportError) as e:
        qat.export(model, out)
    allowed = "a path in a writable directory"
    assert str(e.value) == f"{out}: cannot write the export there (Permission denied); allowed: {allowed}"


@pytest.fixture
def run_dir(make_cfg, digits_float, digits, tmp_path):
    run = tmp_path / "run"
    make_run(run, make_cfg, digits_float, digits, recipe="digits_w8a8")
    return run


def test_qat_export_to_an_unwritable_path_is_one_line(run_dir, under_a_file, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.main([f"run_dir={run_dir}", f"out={under_a_file}", "verify=false"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {under_a_file}: cannot write the export there")


def test_qat_export_verbose_prints_the_traceback_first(run_dir, under_a_file, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.main([f"run_dir={run_dir}", f"out={under_a_file}", "verify=false", "verbose=true"])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith(f"error: {under_a_file}: cannot write the export there")


def test_qat_eval_to_an_unwritable_path_is_one_line(run_dir, under_a_file, capsys):
    out = under_a_file / "eval.json"
    with pytest.raises(SystemExit) as e:
        eval_cli.main([f"run_dir={run_dir}", f"out={out}", "max_batches=1", "repeats=1", "warmup=0"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(under_a_file.parent) in err
