"""Every command answers ``--help``, and ends an error caused by the user's input with one line on stderr
(``error: ...``) and exit code 1, not a traceback (docs/errors.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qat.cli import eval as eval_cli
from qat.cli import export as export_cli
from qat.cli import report as report_cli


@pytest.mark.parametrize("main,usage", [
    (export_cli.main, "usage: qat-export key=value ..."),
    (eval_cli.main, "usage: qat-eval key=value ..."),
    (report_cli.main, "usage: qat-report [-h]"),
])  # fmt: skip
def test_key_value_and_argparse_commands_answer_help(main, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage) and "verbose" in out


@pytest.mark.parametrize("module,usage", [
    ("qat.cli.train", "usage: qat-train [-m] [group=option ...] [key=value ...]"),
    pytest.param("qat.cli.mixed", "usage: qat-mixed [-m] [group=option ...] [key=value ...]",
                 marks=pytest.mark.slow),
])  # fmt: skip
def test_hydra_commands_answer_help(module, usage, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(usage) and "hydra.verbose=true" in proc.stdout
    assert "== Configuration groups ==" in proc.stdout and "quant: " in proc.stdout


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    cmd = [sys.executable, "-m", "qat.cli.train", *overrides, "debug=fast", run_dir]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def _the_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_qat_train_setting_a_field_of_a_float_side_is_one_line(tmp_path):
    line = _the_error_line(_train(tmp_path, "quant=fp32", "quant.weight.format=int4"))
    assert line.startswith("error: quant.weight.format: sets a field inside a config node that is null")


def test_qat_train_with_a_missing_data_file_is_one_line(tmp_path):
    line = _the_error_line(_train(tmp_path, "data=hf", "data.data_files=missing.csv"))
    assert "missing.csv" in line


@pytest.mark.slow  # the data step's in-process test covers the message; this one the CLI's one line
def test_qat_train_without_data_files_is_one_line(tmp_path):
    line = _the_error_line(_train(tmp_path, "data=hf"))
    assert line.startswith("error: data.data_files: ")
