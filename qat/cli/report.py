"""``qat-report``: one table and two plots for every run under the given sweep or run directories.

    qat-report multirun/sweep_digits_bits_methods/2026-01-01_12-00-00
    qat-report outputs/a outputs/b --out reports/ab --x bits

Works while a sweep is still running or after some members failed: it reports what exists. A missing
path, a directory without runs or an unwritable ``--out`` is an error (exit code 1) with a one-line message
(``--verbose`` prints its traceback first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qat.cli._errors import exit_on_user_error
from qat.report import collect, print_table, write_report
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
    p.add_argument(
        "--verbose", action="store_true", help="print the traceback of an error before its one-line message"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with exit_on_user_error(args.verbose, "--verbose"):
        _report(args)
    return 0


def _report(args: argparse.Namespace) -> None:
    records = collect(args.paths)
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


if __name__ == "__main__":
    sys.exit(main())
