"""The sweep table: one row per run, printed to the terminal and written as Markdown and CSV.

Numbers are kept raw in the CSV (bytes, fractions) so spreadsheets can compute with them; the Markdown and
terminal tables show them formatted for reading. Each primary metric (accuracy, perplexity, ...) gets its
own columns, so a report over classification and language-model runs never mixes them in one column.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qat.report.collect import RunRecord

CSV_COLUMNS = [
    "run",
    "path",
    "status",
    "quant",
    "method",
    "w_bits",
    "a_bits",
    "metric",
    "float_value",
    "value",
    "delta_vs_float",
    "recovery",
    "ptq_run",
    "float_bytes",
    "size_bytes",
    "size_source",
    "file_bytes",
    "compression_ratio",
    "bits_per_param",
    "latency_ms",
    "wall_time_s",
    "error",
]


def _raw(v: float | int | None) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def csv_rows(records: list[RunRecord]) -> list[dict[str, str]]:
    rows = []
    for r in records:
        ratio, bpp = r.ratio, r.bits_per_param
        rows.append(
            {
                "run": r.name,
                "path": str(r.path),
                "status": r.status,
                "quant": r.quant,
                "method": r.method,
                "w_bits": _raw(r.w_bits),
                "a_bits": _raw(r.a_bits),
                "metric": r.metric,
                "float_value": _raw(r.baseline),
                "value": _raw(r.quantized),
                "delta_vs_float": _raw(r.delta),
                "recovery": _raw(r.recovery),
                "ptq_run": r.ptq_run,
                "float_bytes": _raw(r.float_bytes),
                "size_bytes": _raw(r.size_bytes),
                "size_source": r.size_source,
                "file_bytes": _raw(r.file_bytes),
                "compression_ratio": _raw(None if ratio is None else round(ratio, 4)),
                "bits_per_param": _raw(None if bpp is None else round(bpp, 4)),
                "latency_ms": _raw(r.latency_ms),
                "wall_time_s": _raw(r.wall_time_s),
                "error": r.error,
            }
        )
    return rows


def to_csv(records: list[RunRecord]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(csv_rows(records))
    return buf.getvalue()


def _fmt_metric(metric: str, v: float | None, delta: bool = False) -> str:
    if v is None:
        return "-"
    if metric == "acc":  # accuracy reads best in percent (points for the delta)
        return f"{100 * v:+.2f}" if delta else f"{100 * v:.2f}%"
    return f"{v:+.4g}" if delta else f"{v:.4g}"


def _fmt_bits(b: float | None) -> str:
    if b is None:
        return "fp"
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n} B"


def _metric_header(metric: str, several: bool) -> list[str]:
    """The value, float and delta columns of one metric; named after it when the report has several."""
    unit = " (pts)" if metric == "acc" else ""
    if not several:
        return [metric or "metric", "float", f"delta{unit}"]
    return [metric, f"float {metric}", f"delta {metric}{unit}"]


def display_rows(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: one column group per primary metric (a run fills its own, "-" in the
    others); the recovery and latency columns only appear when some run has them."""
    show_latency = any(r.latency_ms is not None for r in records)
    show_recovery = any(r.recovery is not None for r in records)
    metrics = list(dict.fromkeys(r.metric for r in records if r.metric)) or [""]
    header = ["run", "status", "method", "W", "A"]
    for m in metrics:
        header += _metric_header(m, len(metrics) > 1)
    header += ["recovery"] if show_recovery else []
    header += ["size", "ratio", "bits/param"] + (["latency (ms)"] if show_latency else [])
    rows = []
    for r in records:
        status = r.status if not r.error else f"{r.status}: {r.error[:60]}"
        row = [r.name, status, r.method, _fmt_bits(r.w_bits), _fmt_bits(r.a_bits)]
        for m in metrics:
            mine = r.metric == m
            row += [
                _fmt_metric(m, r.quantized if mine else None),
                _fmt_metric(m, r.baseline if mine else None),
                _fmt_metric(m, r.delta if mine else None, delta=True),
            ]
        if show_recovery:
            row.append("-" if r.recovery is None else f"{100 * r.recovery:.0f}%")
        row += [
            _fmt_bytes(r.size_bytes),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if r.bits_per_param is None else f"{r.bits_per_param:.2f}",
        ]
        if show_latency:
            row.append("-" if r.latency_ms is None else f"{r.latency_ms:.3g}")
        rows.append(row)
    return header, rows


def to_markdown(records: list[RunRecord], images: list[str] | None = None) -> str:
    header, rows = display_rows(records)

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "failed", "running")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    notes = [
        f"# qat report\n\n{len(records)} runs: {summary}.\n",
        "\n".join(lines),
        "\nsize: bytes of the exported tensors (packed codes, scales / zero points, float-kept tensors), the "
        "same number in `metrics.json` and `export/export_report.json` (the file on disk adds its header: "
        "`file_bytes` in report.csv); ratio = float bytes / size; bits/param = 32 / ratio.\n",
    ]
    if any(r.recovery is not None for r in records):
        notes.append(
            "recovery: the share of PTQ's degradation that QAT removes, (PTQ loss - QAT loss) / PTQ loss "
            "against each run's float baseline, PTQ = the best `mode: ptq` run of the same grid, model and "
            "data (`ptq_run` in report.csv); 100% = float, 0% = no better than PTQ.\n"
        )
    failed = [r for r in records if r.status == "failed"]
    if failed:
        notes.append("## Failed runs\n")
        notes += [f"- `{r.name}`: {r.error or 'no error message'} ({r.path})" for r in failed]
        notes.append("")
    notes += [f"![{Path(i).stem}]({i})\n" for i in images or []]
    return "\n".join(notes)


def print_table(records: list[RunRecord]) -> None:
    """Rich table when rich is installed (colours the status), plain aligned text otherwise."""
    header, rows = display_rows(records)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(show_lines=False)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right", overflow="fold")
    colour = {"ok": "green", "failed": "red", "running": "yellow"}
    for r, row in zip(records, rows, strict=True):
        table.add_row(*row, style=None if r.status == "ok" else colour.get(r.status))
    console = Console()
    if not console.is_terminal:  # piped or logged: do not wrap cells at the default 80 columns
        console = Console(width=max(console.width, 240))
    console.print(table)
