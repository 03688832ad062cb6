"""Sweep reports: collect run directories into a table (terminal, Markdown, CSV) and plots (PNG).

``collect(paths)`` finds and reads runs; ``write_report(records, out_dir)`` writes every artefact. The
plotting module is imported on demand so ``qat-train`` (which records failed runs through
:func:`record_failure`) does not load matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from qat.io import write_text_atomic
from qat.report.collect import ReportError, RunRecord, collect, find_runs, load_record, record_failure
from qat.report.table import print_table, to_csv, to_markdown

__all__ = [
    "ReportError",
    "RunRecord",
    "collect",
    "find_runs",
    "load_record",
    "print_table",
    "record_failure",
    "write_report",
]


def write_report(records: list[RunRecord], out_dir: str | Path, x: str = "size") -> dict[str, Path]:
    """Write report.md, report.csv, pareto.png and curves.png into ``out_dir``; returns what was written.

    A plot is skipped (and missing from the result) when no run has the numbers for it yet.
    """
    from qat.report.plots import curves_plot, pareto_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pareto = pareto_plot(records, out / "pareto.png", x=x)
    curves = curves_plot(records, out / "curves.png")
    images = [p.name for p in (pareto, curves) if p is not None]
    write_text_atomic(out / "report.csv", to_csv(records))
    write_text_atomic(out / "report.md", to_markdown(records, images))
    written = {"csv": out / "report.csv", "markdown": out / "report.md"}
    if pareto is not None:
        written["pareto"] = pareto
    if curves is not None:
        written["curves"] = curves
    return written
