"""qat-report's command line (qat/cli/report.py): outputs, default locations and the errors for bad paths."""

from __future__ import annotations

import csv

import pytest

from qat.cli.report import main


def test_writes_every_artefact_into_the_sweep(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "0_quant=w8a8" in out and "failed" in out
    report = sweep / "report"
    assert sorted(p.name for p in report.iterdir()) == ["curves.png", "pareto.png", "report.csv", "report.md"]
    rows = list(csv.DictReader((report / "report.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "running"]
    # Reporting again finds the same runs: the report folder is not mistaken for a run.
    assert main([str(sweep), "--x", "bits"]) == 0
    assert len(list(csv.DictReader((report / "report.csv").open()))) == 4


def test_out_option_and_several_paths(sweep, tmp_path, make_run):
    other = make_run(tmp_path / "single")
    assert main([str(sweep), str(other), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert len(rows) == 5 and rows[0]["run"] == "sweep/0_quant=w8a8" and rows[-1]["run"] == "single"


def test_missing_directory_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: path: ") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_empty_directory_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 1
    assert "no runs under" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_only_running_runs_give_a_table_without_plots(tmp_path, make_run, capsys):
    make_run(tmp_path / "sweep" / "0_quant=w8a8", status="running")
    assert main([str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "pareto    skipped" in out and "curves    skipped" in out
    assert (tmp_path / "sweep" / "report" / "report.csv").exists()


def test_unwritable_out_is_one_line(sweep, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a directory\n")
    with pytest.raises(SystemExit) as e:
        main([str(sweep), "--out", str(tmp_path / "notes.txt" / "report")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "notes.txt") in err and err.count("\n") == 1
