"""Find the runs under sweep or run directories and turn each one into a flat :class:`RunRecord`.

A run directory is one that ``qat-train`` wrote: it holds ``metrics.json`` once the run ended (``status``
"ok", or "failed" with the error when the run raised) and ``.hydra/config.yaml`` from the start, so a run
that is still going (or was killed) shows up as "running". Optional extras are read when present:
``export/export_report.json`` (the exported size and file size) and ``eval.json`` (latency). Sizes follow
:mod:`qat.size`: ``metrics.json`` and the export report hold the same number.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qat import runs
from qat.deploy.schema import REPORT_FILE
from qat.report import recovery

STATUSES = ("ok", "failed", "running")


class ReportError(RuntimeError):
    """Nothing to report on: a path is missing or holds no run; the message names the path."""


@dataclass
class RunRecord:
    """One run as the report sees it; numbers are None when the run did not produce them."""

    path: Path
    name: str
    status: str
    quant: str = "?"
    method: str = "?"
    mode: str = "?"  # "qat", "ptq" or "float"
    grid: str | None = None  # what a QAT run shares with its PTQ counterpart (qat.report.recovery)
    w_bits: float | None = None
    a_bits: float | None = None
    metric: str = ""
    higher_is_better: bool = True
    baseline: float | None = None
    quantized: float | None = None
    float_bytes: int | None = None
    size_bytes: int | None = None
    size_source: str = ""  # "export" (export_report.json) or "metrics" (metrics.json): the same definition
    file_bytes: int | None = None  # model.safetensors on disk, when the run was exported
    latency_ms: float | None = None
    wall_time_s: float | None = None
    error: str = ""
    recovery: float | None = None  # share of the best same-grid PTQ run's degradation this run removes
    ptq_run: str = ""  # that PTQ run's name
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def delta(self) -> float | None:
        """Quantized minus float metric (negative accuracy / positive perplexity = worse)."""
        if self.baseline is None or self.quantized is None:
            return None
        return self.quantized - self.baseline

    @property
    def degradation(self) -> float | None:
        """Loss against the float baseline, positive = worse, whichever way the metric points."""
        return recovery.degradation(self.baseline, self.quantized, self.higher_is_better)

    @property
    def ratio(self) -> float | None:
        """Compression ratio: float bytes / quantized (exported) bytes."""
        if not self.float_bytes or not self.size_bytes:
            return None
        return self.float_bytes / self.size_bytes

    @property
    def bits_per_param(self) -> float | None:
        """Storage bits per parameter, scales and float-kept tensors included (32 = float)."""
        r = self.ratio
        return None if r is None else 32.0 / r

    @property
    def bits_label(self) -> str:
        """Weight and activation bits of the base specs, e.g. 'W4A8' ('Wfp' for a float side)."""
        return f"W{_bits_str(self.w_bits)}A{_bits_str(self.a_bits)}"

    @property
    def label(self) -> str:
        """Short plot label: method and bit widths, e.g. 'qat lsq W4A8'."""
        return "float" if self.method == "float" else f"{self.method} {self.bits_label}"


def _bits_str(bits: float | None) -> str:
    if bits is None:
        return "fp"
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def is_run_dir(path: Path) -> bool:
    return runs.metrics_file(path).is_file() or runs.hydra_config_file(path).is_file()


def _natural_key(path: Path) -> list[Any]:
    """Sort 'run 10' after 'run 9' (Hydra job numbers prefix the sweep subdirectories)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every run directory at or below ``paths``: in the order of ``paths``, natural order below each.

    Raises :class:`ReportError` for a path that does not exist, and when no run is found at all.
    """
    if not paths:
        raise ReportError("paths: none given; pass one or more sweep or run directories")
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"path: {str(p)!r} does not exist; pass a sweep or run directory")
        if not p.is_dir():
            raise ReportError(f"path: {str(p)!r} is not a directory; pass a sweep or run directory")
        if is_run_dir(p):
            found.append(p)
            continue
        below = []
        for root, dirs, _files in os.walk(p):
            r = Path(root)
            if is_run_dir(r):
                below.append(r)
                dirs.clear()  # a run's own subfolders (checkpoints, logs, export) hold no runs
                continue
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += sorted(below, key=_natural_key)
    unique = list({f.resolve(): f for f in found}.values())
    if not unique:
        where = ", ".join(repr(str(p)) for p in paths)
        raise ReportError(
            f"path: no runs under {where}; a run directory holds metrics.json or .hydra/config.yaml "
            "(is the sweep still starting, or is this the wrong directory?)"
        )
    return unique


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None when absent or unreadable (a run may be writing it right now)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_config(run: Path) -> dict[str, Any]:
    for cand in (runs.config_file(run), runs.hydra_config_file(run)):
        try:
            data = yaml.safe_load(cand.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def _spec_bits(spec: Any) -> float | None:
    """Bits of a quant spec mapping (None for a float side)."""
    if not isinstance(spec, dict) or "format" not in spec:
        return None
    from qat.config import FORMATS, format_bits

    fmt = str(spec["format"])
    return format_bits(fmt) if fmt in FORMATS else None


def method_of(config: dict[str, Any], mode: str | None = None) -> str:
    """A short method name from the run's config: 'float', or mode + weight scale source (+kd: QAT with
    distillation).

    E.g. 'qat lsq' (learned step size), 'ptq mse' (calibrated MSE-optimal ranges), 'qat lsq+kd'.
    """
    quant = config.get("quant") or {}
    weight = quant.get("weight")
    mode = mode or str(config.get("mode", "qat"))
    if mode == "float" or (weight is None and quant.get("activation") is None):
        return "float"
    side = weight if isinstance(weight, dict) else quant.get("activation") or {}
    scale = side.get("scale")
    if scale is None:
        try:
            from qat.config import QuantSpec

            scale = QuantSpec.from_dict(side).scale
        except Exception:  # noqa: BLE001 - a label only; a broken spec is reported by the run itself
            scale = "?"
    if side.get("dynamic"):
        scale = "dynamic"
    distill = config.get("distill") or {}
    trained = mode == "qat" and isinstance(distill, dict)  # PTQ trains nothing: a distill node is unused
    kd = "+kd" if trained and float(distill.get("weight", 0) or 0) > 0 else ""
    return f"{mode} {scale}{kd}"


def _latency_ms(ev: dict[str, Any]) -> float | None:
    """Latency from eval.json: ``latency_ms``, or ``latency: {mean_ms | median_ms | p50_ms | ms}``."""
    cands: list[Any] = [ev.get("latency_ms")]
    lat = ev.get("latency")
    if isinstance(lat, dict):
        cands += [lat.get(k) for k in ("mean_ms", "median_ms", "p50_ms", "ms")]
    elif isinstance(lat, (int, float)):
        cands.append(lat)
    for v in cands:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def load_record(run: Path, name: str | None = None) -> RunRecord:
    """Everything the report shows about one run directory (never raises on a partial run)."""
    name = name or run.name
    metrics = _read_json(runs.metrics_file(run))
    config = (metrics or {}).get("config") or _read_config(run)
    status = "running" if metrics is None else str(metrics.get("status", "ok"))
    rec = RunRecord(path=run, name=name, status=status, config=config)
    quant = config.get("quant") or {}
    rec.quant = str((metrics or {}).get("quant") or quant.get("name") or "custom")
    mode = (metrics or {}).get("mode")
    rec.method = method_of(config, mode if status == "ok" else None)
    rec.mode = "float" if rec.method == "float" else str(mode or config.get("mode", "qat"))
    rec.w_bits = _spec_bits(quant.get("weight"))
    rec.a_bits = _spec_bits(quant.get("activation"))
    if metrics is None:
        return rec
    rec.metric = str(metrics.get("primary_metric", ""))
    rec.higher_is_better = bool(metrics.get("higher_is_better", True))
    rec.grid = recovery.grid_key(config, rec.metric)
    rec.baseline = _num((metrics.get("baseline") or {}).get(rec.metric))
    rec.quantized = _num((metrics.get("quantized") or {}).get(rec.metric))
    sizes = metrics.get("size_bytes") or {}
    rec.float_bytes = int(sizes["baseline"]) if _num(sizes.get("baseline")) else None
    if _num(sizes.get("quantized")):
        rec.size_bytes, rec.size_source = int(sizes["quantized"]), "metrics"
    export = _read_json(runs.export_dir(run) / REPORT_FILE)
    if export and _num(export.get("exported_bytes")):
        rec.size_bytes, rec.size_source = int(export["exported_bytes"]), "export"
        if _num(export.get("float_bytes")):
            rec.float_bytes = int(export["float_bytes"])
        if _num(export.get("file_bytes")):
            rec.file_bytes = int(export["file_bytes"])
    ev = _read_json(runs.eval_file(run))
    if ev:
        rec.latency_ms = _latency_ms(ev)
    rec.wall_time_s = _num(metrics.get("wall_time_s"))
    rec.error = str(metrics.get("error", ""))
    return rec


def collect(paths: list[str | Path]) -> list[RunRecord]:
    """Records for every run under ``paths``, named relative to the directory given.

    With several paths each name starts with its path's folder name, so equal sweep subfolders of two
    sweeps stay apart. Hydra sweep members (``<num>_<overrides>``) drop the overrides that all their
    siblings share (``debug=fast`` on every member says nothing).
    """
    roots = [Path(p) for p in paths]
    records = []
    for run in find_runs(paths):
        root = next(r for r in roots if run == r or r in run.parents)
        rel = run.name if run == root else str(run.relative_to(root))
        name = f"{root.name}/{rel}" if len(roots) > 1 and run != root else rel
        records.append(load_record(run, name))
    _shorten_sweep_names(records)
    recovery.pair(records)
    return records


_SWEEP_MEMBER = re.compile(r"^(\d+)_(.+)$")


def _shorten_sweep_names(records: list[RunRecord]) -> None:
    by_parent: dict[Path, list[tuple[RunRecord, str, list[str]]]] = {}
    for r in records:
        m = _SWEEP_MEMBER.match(r.path.name)
        if m:
            by_parent.setdefault(r.path.parent, []).append((r, m.group(1), m.group(2).split(",")))
    for members in by_parent.values():
        if len(members) < 2:
            continue
        common = set.intersection(*(set(tokens) for _, _, tokens in members))
        for r, num, tokens in members:
            kept = ",".join(t for t in tokens if t not in common) or "-"
            r.name = r.name[: -len(r.path.name)] + f"{num}_{kept}"


def record_failure(output_dir: str | Path, exc: BaseException, config: Any = None) -> Path:
    """Write ``metrics.json`` with ``status: failed`` and the error, keeping figures already written.

    Called by ``qat-train`` when a run raises, so the report lists it as failed (and, in a sweep, the
    launcher goes on with the other members). ``config``: the run's (Omega)config, saved resolved.
    """
    from omegaconf import DictConfig, OmegaConf

    from qat.io import write_json_atomic

    path = runs.metrics_file(output_dir)
    data = _read_json(path) or {}
    if isinstance(config, DictConfig):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except Exception:  # noqa: BLE001 - a broken interpolation may be the very failure being recorded
            config = OmegaConf.to_container(config, resolve=False)
    if isinstance(config, dict) and "config" not in data:
        data["config"] = config
    cfg = data.get("config") or {}
    if "primary_metric" not in data and cfg.get("task"):
        from qat.tasks import TASKS

        task = TASKS.get(str(cfg["task"]))
        metric, higher = (task.metric, task.higher_is_better) if task else ("", True)
        data.update(primary_metric=metric, higher_is_better=higher)
    quant = cfg.get("quant") or {}
    data.setdefault("quant", str(quant.get("name", "custom")))
    data["status"] = "failed"
    data["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    data["traceback"] = "".join(traceback.format_exception(exc)[-6:])
    data["failed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(path, data)
    return path
