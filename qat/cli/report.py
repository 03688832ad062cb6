"""``qat-report``: one table and two plots for every run under the given sweep or run directories.

    qat-report multirun/sweep_digits_bits_methods/2026-01-01_12-00-00
    qat-report outputs/a outputs/b --out reports/ab --x bits

Works while a sweep is still running or after some members failed: it reports what exists. A missing
path or a directory without runs is an error (exit code 1) with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qat.report import ReportError, collect, print_table, write_report
from qat.report.plots import X_AXES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qat-report", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="sweep directories (multirun/...) or single run directories")
    p.add_argument(
        "--out",
        default=None,
        help="where report.md, report.csv, pareto.png and curves.png go "
        "(default: <path>/report for one path, ./report for several)",
    )
    p.add_argument(
        "--x",
        default="size",
        choices=X_AXES,
        help="Pareto x axis: exported size in KiB, or storage bits per parameter (default: size)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = collect(args.paths)
    except ReportError as e:
        print(f"qat-report: error: {e}", file=sys.stderr)
        return 1
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report")
    print_table(records)
    written = write_report(records, out, x=args.x)
    for kind, path in written.items():
        print(f"{kind:9s} {path}")
    for missing in {"pareto", "curves"} - set(written):
        print(f"{missing:9s} skipped: no finished run has the numbers for it yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
