"""Recovery in the report: a QAT run against the best PTQ run of the same grid, model and data."""

from __future__ import annotations

import pytest

from qat.report import collect
from qat.report.table import csv_rows, to_markdown


def _by_name(records):
    return {r.name: r for r in records}


def test_recovery_pairs_qat_with_the_best_ptq_run_of_the_same_grid(tmp_path, make_run):
    # float 0.95; PTQ min/max loses 0.15, PTQ MSE 0.10 (the reference); QAT loses 0.02 -> 80% recovered
    make_run(tmp_path / "ptq_minmax", mode="ptq", scale="minmax", value=0.80)
    make_run(tmp_path / "ptq_mse", mode="ptq", scale="mse", value=0.85)
    make_run(tmp_path / "qat", mode="qat", scale="lsq", value=0.93)
    make_run(tmp_path / "qat_other_grid", mode="qat", w_fmt="int2", value=0.93)
    make_run(tmp_path / "qat_other_model", mode="qat", model="mlp", value=0.93)
    runs = _by_name(collect([tmp_path]))
    assert runs["qat"].recovery == pytest.approx(0.8)
    assert runs["qat"].ptq_run == "ptq_mse"
    assert runs["qat_other_grid"].recovery is None  # int2 weights: no PTQ counterpart
    assert runs["qat_other_model"].recovery is None
    assert runs["ptq_mse"].recovery is None  # recovery is a QAT run's figure
    row = next(r for r in csv_rows(list(runs.values())) if r["run"] == "qat")
    assert float(row["recovery"]) == pytest.approx(0.8) and row["ptq_run"] == "ptq_mse"
    assert "| 80% |" in to_markdown(list(runs.values()))


def test_recovery_of_a_lower_is_better_metric(tmp_path, make_run):
    # perplexity: float 10, PTQ 12.4 (+2.4), QAT 10.6 (+0.6) -> 75% recovered; a QAT run worse than PTQ
    # gets a negative figure
    make_run(tmp_path / "ptq", mode="ptq", metric="ppl", baseline=10.0, value=12.4, scale="mse")
    make_run(tmp_path / "qat", mode="qat", metric="ppl", baseline=10.0, value=10.6)
    make_run(tmp_path / "qat_bad", mode="qat", metric="ppl", baseline=10.0, value=13.6, scale="minmax")
    runs = _by_name(collect([tmp_path]))
    assert runs["qat"].recovery == pytest.approx(0.75)
    assert runs["qat_bad"].recovery == pytest.approx(-0.5)


def test_no_recovery_when_ptq_lost_nothing_or_there_is_no_ptq_run(tmp_path, make_run):
    make_run(tmp_path / "a" / "ptq", mode="ptq", value=0.96)  # better than float: nothing to recover
    make_run(tmp_path / "a" / "qat", mode="qat", value=0.95)
    make_run(tmp_path / "b" / "qat", mode="qat", value=0.95)
    records = collect([tmp_path / "a", tmp_path / "b"])
    assert all(r.recovery is None for r in records)
    assert "recovery" not in to_markdown(records)
