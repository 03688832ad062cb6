"""The report's figures: metric vs size with the Pareto front, and validation curves over training steps.

Figures are built with matplotlib's object API (no pyplot state, no display needed) and written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from qat.report.collect import RunRecord
from qat.report.table import write_atomic

X_AXES = ("size", "bits")
PHASES = ("float", "qat")


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


def _x_label(x: str, records: list[RunRecord]) -> str:
    if x == "bits":
        return "storage bits per parameter (bits; scales and float-kept tensors included)"
    est = any(r.size_source == "estimate" for r in records)
    return "model size (KiB" + (", exported or estimated)" if est else ", exported)")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    return buf.getvalue()


def _colours(methods: list[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    palette += ["tab:olive", "tab:cyan", "tab:gray"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


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
        labels: list[str] = []
        for r in runs:
            if r.method == "float":
                continue
            xv = _x_value(r, x)
            assert xv is not None and r.quantized is not None
            pts.append((xv, k * r.quantized))
            labels.append(r.label)
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
            labels.append("float")
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
        _annotate(ax, pts, labels)
        xs = [p[0] for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
        ax.set_xlabel(_x_label(x, runs))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best", title="method", title_fontsize=8)
        what = "bits per parameter" if x == "bits" else "size"
        ax.set_title(f"{metric} vs {what}: {len(runs)} finished runs, front dashed", fontsize=10)
    failed = sum(r.status == "failed" for r in records)
    running = sum(r.status == "running" for r in records)
    if failed or running:
        fig.suptitle(f"not shown: {failed} failed, {running} running", fontsize=9, color="firebrick")
    write_atomic(path, _png(fig))
    return path


def _annotate(ax, pts: list[tuple[float, float]], labels: list[str]) -> None:
    """Label each point; points at the same spot share one stacked label so the text never overlaps."""
    groups: dict[tuple[float, float], list[str]] = {}
    for (px, py), lab in zip(pts, labels, strict=True):
        groups.setdefault((round(px, 4), round(py, 4)), []).append(lab)
    for (px, py), labs in groups.items():
        text = "\n".join(dict.fromkeys(labs))
        ax.annotate(
            text,
            (px, py),
            xytext=(6, -4),
            textcoords="offset points",
            fontsize=7,
            va="top",
            ha="left",
            zorder=5,
        )


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

    Float curves that are identical across runs (same seed and baseline recipe) are drawn once. Returns
    None when no run has logged a validation metric yet (e.g. only TensorBoard/MLflow loggers were used).
    """
    series: dict[str, list[tuple[RunRecord, str, list[int], list[float]]]] = {p: [] for p in PHASES}
    for r in records:
        for phase in PHASES:
            c = read_curve(r.path / "logs" / phase / "metrics.csv", r.metric or None)
            if c is not None:
                series[phase].append((r, *c))
    if not any(series.values()):
        return None
    metric_cols = list(dict.fromkeys(col for s in series.values() for _, col, _, _ in s))
    fig = Figure(figsize=(13, 4.8 * len(metric_cols)), layout="constrained")
    axes = fig.subplots(len(metric_cols), 2, squeeze=False)
    methods = list(dict.fromkeys(r.method for r in records))
    colours = _colours(methods)
    styles = ["-", "--", ":", "-."]
    for row, col in enumerate(metric_cols):
        metric = col.split("/", 1)[1]
        ylabel, k = _metric_axis(metric, metric != "ppl")
        ylabel = ylabel.replace("test ", "validation ")
        for ax, phase in zip(axes[row], PHASES, strict=True):
            seen: dict[tuple[tuple[int, ...], tuple[float, ...]], int] = {}
            n_style: dict[str, int] = {}
            for r, c, steps, values in series[phase]:
                if c != col:
                    continue
                key = (tuple(steps), tuple(round(v, 7) for v in values))
                if phase == "float" and key in seen:
                    seen[key] += 1
                    continue
                seen[key] = 1
                if phase == "float":
                    colour, style = "dimgray", styles[(len(seen) - 1) % len(styles)]
                    label = f"baseline of {r.name}"
                else:
                    i = n_style.get(r.method, 0)
                    n_style[r.method] = i + 1
                    colour, style = colours[r.method], styles[i % len(styles)]
                    label = f"{r.label} ({r.name})" + (" [running]" if r.status == "running" else "")
                ax.plot(
                    steps,
                    [k * v for v in values],
                    style,
                    color=colour,
                    marker="o",
                    markersize=3,
                    linewidth=1.3,
                    label=label,
                )
            n_same = next(iter(seen.values()), 0)
            if phase == "float" and len(seen) == 1 and n_same > 1:
                ax.get_lines()[-1].set_label(f"float baseline (identical in {n_same} runs)")
            ax.set_xlabel(f"{'float' if phase == 'float' else 'QAT'} training step (optimizer steps)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{'float baseline' if phase == 'float' else 'QAT'} phase: {col}", fontsize=10)
            ax.grid(True, alpha=0.3)
            n_lines = len(ax.get_lines())
            if n_lines > 6:  # a long legend would hide the curves: put it under the panel
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
            elif n_lines:
                ax.legend(fontsize=7, loc="best")
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no validation logged in this phase",
                    transform=ax.transAxes,
                    ha="center",
                    color="gray",
                )
    write_atomic(path, _png(fig))
    return path
