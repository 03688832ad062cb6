"""The report's figures: metric vs size with the Pareto front, and validation curves over training steps.

Figures are built with matplotlib's object API (no pyplot state, no display needed) and written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from qat.io import write_bytes_atomic
from qat.report.collect import RunRecord
from qat.report.labels import Note, place_labels
from qat.runs import PHASES, log_dir
from qat.tasks import TASKS

X_AXES = ("size", "bits")
HIGHER_IS_BETTER = {t.metric: t.higher_is_better for t in TASKS.values()}  # of each primary metric


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated points (smaller x and better y win), ordered by x.

    A point is on the front when no other point is at most as large and at least as good with one of the
    two strictly better.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        y = sign * points[i][1]
        if y > best:
            front.append(i)
            best = y
    return front


def _metric_axis(metric: str, higher: bool) -> tuple[str, float]:
    """Axis label and the factor applied to the values (accuracy is shown in percent)."""
    if metric == "acc":
        return "test accuracy (%)  ↑ better", 100.0
    if metric == "ppl":
        return "test perplexity (tokens, lower is better)  ↓ better", 1.0
    return f"test {metric} ({'higher' if higher else 'lower'} is better)", 1.0


def _x_value(r: RunRecord, x: str) -> float | None:
    if x == "bits":
        return r.bits_per_param
    return None if r.size_bytes is None else r.size_bytes / 1024


def _x_label(x: str) -> str:
    if x == "bits":
        return "storage bits per parameter (bits; scales and float-kept tensors included)"
    return "model size (KiB of exported tensors: codes, scales, float-kept)"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    return buf.getvalue()


PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
PALETTE += ["tab:olive", "tab:cyan", "tab:gray"]
LINE_STYLES = ["-", "--", ":", "-."]


def _colours(methods: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def _line_style(i: int) -> tuple[str, str]:
    """Colour and line style of the ``i``-th curve of a panel: all colours first, then the next style, so
    that 40 curves look different from each other."""
    return PALETTE[i % len(PALETTE)], LINE_STYLES[(i // len(PALETTE)) % len(LINE_STYLES)]


def pareto_plot(records: list[RunRecord], path: Path, x: str = "size") -> Path | None:
    """Primary metric against size (or bits per parameter), one point per finished run, front drawn.

    One panel per primary metric (a report over a CNN and a language model sweep gets two). The float
    baselines are drawn as stars. Returns None when no run has both numbers yet.
    """
    if x not in X_AXES:
        raise ValueError(f"x: {x!r} is not valid; allowed: {', '.join(X_AXES)}")
    done = [r for r in records if r.status == "ok" and r.quantized is not None and _x_value(r, x) is not None]
    if not done:
        return None
    metrics = list(dict.fromkeys(r.metric for r in done))
    fig = Figure(figsize=(7.5 * len(metrics), 5.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = _colours(list(dict.fromkeys(r.method for r in done if r.method != "float")))
    for ax, metric in zip(axes, metrics, strict=True):
        runs = [r for r in done if r.metric == metric]
        higher = runs[0].higher_is_better
        ylabel, k = _metric_axis(metric, higher)
        pts: list[tuple[float, float]] = []
        notes: list[Note] = []
        for r in runs:
            if r.method == "float":
                continue
            xv = _x_value(r, x)
            assert xv is not None and r.quantized is not None
            pts.append((xv, k * r.quantized))
            notes.append(
                Note(
                    xv,
                    k * r.quantized,
                    r.bits_label,
                    f"{r.method}  {_fmt_value(metric, r.quantized)}",
                    colours[r.method],
                )
            )
            ax.scatter(
                xv,
                k * r.quantized,
                s=46,
                color=colours[r.method],
                zorder=3,
                edgecolors="black",
                linewidths=0.5,
                label=r.method,
            )
        # Float references: the baseline each run trained (deduplicated), and float-only runs.
        refs = {}
        for r in runs:
            if r.baseline is not None and r.float_bytes:
                fx = 32.0 if x == "bits" else r.float_bytes / 1024
                refs[(round(fx, 6), round(r.baseline, 9))] = (fx, k * r.baseline)
        for fx, fy in refs.values():
            pts.append((fx, fy))
            notes.append(Note(fx, fy, "float", "", "black"))
            ax.scatter(
                fx,
                fy,
                marker="*",
                s=180,
                color="gold",
                edgecolors="black",
                linewidths=0.7,
                zorder=4,
                label="float baseline",
            )
        front = pareto_front(pts, higher)
        fxs = [pts[i][0] for i in front]
        fys = [pts[i][1] for i in front]
        ax.scatter(fxs, fys, s=140, facecolors="none", edgecolors="black", linewidths=1.0, zorder=2)
        # The staircase runs on to the largest run: everything right of / below it is dominated.
        fxs.append(max(p[0] for p in pts))
        fys.append(fys[-1])
        ax.step(
            fxs,
            fys,
            where="post",
            color="black",
            linestyle="--",
            linewidth=1.2,
            zorder=2,
            label="Pareto front",
        )
        xs = [p[0] for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
            _plain_log_ticks(ax, xs)
        ax.margins(x=0.1)  # room for the labels right of the largest points
        place_labels(ax, notes, list(zip(fxs, fys, strict=True)))
        ax.set_xlabel(_x_label(x))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best", title="method", title_fontsize=8)
        what = "storage bits per parameter" if x == "bits" else "model size"
        ax.set_title(
            f"test {metric} vs {what}: {len(runs)} finished runs (Pareto front dashed, circled)", fontsize=10
        )
    failed = sum(r.status == "failed" for r in records)
    running = sum(r.status == "running" for r in records)
    if failed or running:
        fig.suptitle(f"not shown: {failed} failed, {running} running", fontsize=9, color="firebrick")
    write_bytes_atomic(path, _png(fig))
    return path


def _fmt_value(metric: str, v: float) -> str:
    return f"{100 * v:.2f}%" if metric == "acc" else f"{v:.4g}"


def _plain_log_ticks(ax, xs: list[float]) -> None:
    """Log axis ticks at the runs' own sizes, written as plain numbers (not 6x10^0)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ticks: list[float] = []
    for v in sorted(set(xs)):
        if not ticks or v / ticks[-1] > 1.12:  # closer ticks would print on top of each other
            ticks.append(v)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def read_curve(csv_path: Path, metric: str | None = None) -> tuple[str, list[int], list[float]] | None:
    """(column, steps, values) of the validation metric in a Lightning CSVLogger ``metrics.csv``.

    ``metric`` picks ``val/<metric>``; otherwise the first ``val/*`` column that is not the loss. A last
    row without its newline (being written while the run goes on) and non-numeric cells are skipped.
    """
    try:
        text = csv_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.endswith("\n"):  # the logger is writing the last row right now: leave it out
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    cols = reader.fieldnames or []
    want = f"val/{metric}" if metric else None
    col = want if want in cols else next((c for c in cols if c.startswith("val/") and c != "val/loss"), None)
    if col is None or "step" not in cols:
        return None
    steps, values = [], []
    for row in reader:
        try:
            v, s = float(row.get(col) or "nan"), int(float(row.get("step") or "nan"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            steps.append(s)
            values.append(v)
    return (col, steps, values) if steps else None


def curves_plot(records: list[RunRecord], path: Path) -> Path | None:
    """Validation metric over training steps: float phase (left) and QAT phase (right), one line per run.

    A phase no run trained (e.g. every run loaded its float baseline) gets no panel. Float curves that
    are identical across runs (same seed and baseline recipe) are drawn once. Every curve of a panel has its
    own colour and line style, and its legend entry names the run (method and bits, plus the run's name
    where two runs share those). Returns None when no run has logged a validation metric yet (e.g. only
    TensorBoard/MLflow loggers were used).
    """
    series: dict[str, list[tuple[RunRecord, str, list[int], list[float]]]] = {p: [] for p in PHASES}
    for r in records:
        for phase in PHASES:
            c = read_curve(log_dir(r.path, phase) / "metrics.csv", r.metric or None)
            if c is not None:
                series[phase].append((r, *c))
    phases = [p for p in PHASES if series[p]]
    if not phases:
        return None
    metric_cols = list(dict.fromkeys(col for p in phases for _, col, _, _ in series[p]))
    fig = Figure(figsize=(6.5 * len(phases), 4.8 * len(metric_cols)), layout="constrained")
    axes = fig.subplots(len(metric_cols), len(phases), squeeze=False)
    for row, col in enumerate(metric_cols):
        metric = col.split("/", 1)[1]
        ylabel, k = _metric_axis(metric, HIGHER_IS_BETTER.get(metric, True))
        ylabel = ylabel.replace("test ", "validation ")
        for ax, phase in zip(axes[row], phases, strict=True):
            curves = [c for c in series[phase] if c[1] == col]
            if phase == "float":
                _float_curves(ax, curves, k)
                title = f"float baseline training: {col}"
            else:
                labels = [r.label for r, *_ in curves]
                for i, (r, _c, steps, values) in enumerate(curves):
                    label = r.label if labels.count(r.label) == 1 else f"{r.label} ({r.name})"
                    label += " [running]" if r.status == "running" else ""
                    colour, style = _line_style(i)
                    ax.plot(steps, [k * v for v in values], style, color=colour, marker="o", markersize=3,
                            linewidth=1.3, label=label)  # fmt: skip
                missing = sum(
                    r.status == "ok" and r.method != "float" and r.metric == metric for r in records
                ) - sum(r.status == "ok" for r, *_ in curves)
                title = f"QAT: {col}, {len(curves)} run{'' if len(curves) == 1 else 's'}"
                if missing > 0:
                    title += f" (no curve for {missing}: PTQ runs do not train)"
            ax.set_xlabel(f"{'float' if phase == 'float' else 'QAT'} training step (optimizer steps)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
            if len(ax.get_lines()) > 6:  # a long legend would hide the curves: put it under the panel
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
            else:
                ax.legend(fontsize=7, loc="best")
    write_bytes_atomic(path, _png(fig))
    return path


def _float_curves(ax, curves: list[tuple[RunRecord, str, list[int], list[float]]], k: float) -> None:
    """One line per distinct float baseline curve, labelled with how many runs share it."""
    groups: dict[tuple[tuple[int, ...], tuple[float, ...]], list[RunRecord]] = {}
    data: dict[tuple[tuple[int, ...], tuple[float, ...]], tuple[list[int], list[float]]] = {}
    for r, _c, steps, values in curves:
        key = (tuple(steps), tuple(round(v, 7) for v in values))
        groups.setdefault(key, []).append(r)
        data[key] = (steps, values)
    for i, (key, runs) in enumerate(groups.items()):
        steps, values = data[key]
        label = f"{runs[0].name}" if len(runs) == 1 else f"shared by {len(runs)} runs"
        colour, style = _line_style(i)
        ax.plot(steps, [k * v for v in values], style, color=colour, marker="o", markersize=3, linewidth=1.3,
                label=f"float baseline, {label}")  # fmt: skip
