"""The table: CSV rows and raw numbers, Markdown with failures, terminal output."""

from __future__ import annotations

import csv
import io

import pytest

from qat.io import write_bytes_atomic, write_text_atomic
from qat.report.collect import collect
from qat.report.table import CSV_COLUMNS, print_table, to_csv, to_markdown


def test_csv_has_one_row_per_run_with_raw_numbers(sweep):
    rows = list(csv.DictReader(io.StringIO(to_csv(collect([sweep])))))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "running"]
    r8, r4, failed, running = rows
    assert (r8["w_bits"], r8["a_bits"], r8["metric"]) == ("8", "8", "acc")
    assert float(r8["delta_vs_float"]) == pytest.approx(float(r8["value"]) - float(r8["float_value"]))
    assert float(r8["compression_ratio"]) == 3.2 and float(r8["bits_per_param"]) == 10.0
    assert r4["size_bytes"] == "1400" and r4["size_source"] == "export" and r4["latency_ms"] == "2.5"
    assert r4["file_bytes"] == "1500" and r8["file_bytes"] == ""
    assert failed["error"] == "ValueError: boom" and failed["value"] == ""
    assert running["value"] == "" and running["w_bits"] == "2"


def test_markdown_formats_and_lists_failures(sweep):
    md = to_markdown(collect([sweep]), images=["pareto.png"])
    assert "4 runs: 2 ok, 1 failed, 1 running." in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = lines[0]
    assert "latency (ms)" in header and "delta (pts)" in header  # latency column: one run measured it
    row8 = next(line for line in lines if line.startswith("| 0_quant=w8a8"))
    assert "94.00%" in row8 and "-1.00" in row8 and "| 2.4 KiB |" in row8 and "3.20x" in row8
    assert "## Failed runs" in md and "`2_quant=w4g7`: ValueError: boom" in md
    assert "![pareto](pareto.png)" in md


def test_latency_column_only_when_measured(tmp_path, make_run):
    make_run(tmp_path / "a")
    assert "latency" not in to_markdown(collect([tmp_path / "a"]))


def test_print_table_shows_every_run(sweep, capsys):
    print_table(collect([sweep]))
    out = capsys.readouterr().out
    for name in ("0_quant=w8a8", "1_quant=w4a4", "2_quant=w4g7", "10_quant=w2a2"):
        assert name in out
    assert "failed" in out and "running" in out


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "report.md"
    write_text_atomic(target, "one")
    write_bytes_atomic(target, b"two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def _markdown_rows(md: str) -> list[dict[str, str]]:
    """The Markdown table as one {header: cell} dict per run."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]


def test_accuracy_and_perplexity_runs_never_share_a_column(tmp_path, make_run):
    """A classification run's 60.00% must not land in a `ppl` column (nor a perplexity in an `acc` one)."""
    make_run(tmp_path / "lm", metric="ppl", value=12.5, baseline=11.0)
    make_run(tmp_path / "cls", value=0.6, baseline=0.9)
    lm, cls = _markdown_rows(to_markdown(collect([tmp_path / "lm", tmp_path / "cls"])))
    assert (lm["ppl"], lm["float ppl"], lm["delta ppl"]) == ("12.5", "11", "+1.5")
    assert (lm["acc"], lm["float acc"], lm["delta acc (pts)"]) == ("-", "-", "-")
    assert (cls["acc"], cls["float acc"], cls["delta acc (pts)"]) == ("60.00%", "90.00%", "-30.00")
    assert (cls["ppl"], cls["float ppl"], cls["delta ppl"]) == ("-", "-", "-")
    # One kind of metric keeps the short header.
    (only,) = _markdown_rows(to_markdown(collect([tmp_path / "cls"])))
    assert (only["acc"], only["float"], only["delta (pts)"]) == ("60.00%", "90.00%", "-30.00")
