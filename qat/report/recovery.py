"""Recovery: how much of post-training quantization's accuracy loss a QAT run wins back.

``recovery = (PTQ degradation - QAT degradation) / PTQ degradation``, the figure QAT vendors quote
(Gemma 3's Q4_0 QAT, torchao/torchtune's "recovered 68% of the perplexity degradation"). Degradation is
each run's own loss against its float baseline: ``float - quantized`` for a metric where higher is better
(accuracy), ``quantized - float`` otherwise (perplexity). 1.0 = QAT matches float, 0 = no better than
PTQ, negative = worse than PTQ.

A QAT run's PTQ counterpart is a ``mode: ptq`` run of the **same grid** on the same task, model and data:
the same formats, granularities, group sizes, symmetry and dynamic flags on every side and every
per-layer override, and the same include/exclude globs. How a scale is found (LSQ, MSE, min/max, ...) and
how the model is trained are the method, not the grid, so they may differ. With several PTQ counterparts
(e.g. min/max and MSE ranges), the best one (smallest degradation) is the reference: QAT is credited only
for what no PTQ run of the sweep reached.
"""

from __future__ import annotations

import json
from typing import Any

# How a scale is found, not what grid it lands on: left out of the grid key.
METHOD_KEYS = frozenset({"scale", "init", "percentile", "ema_decay"})
# Training and loading knobs of the data config that do not change which examples are evaluated.
LOADER_KEYS = frozenset({"batch_size", "num_workers", "seed", "pin_memory"})


def _grid(spec: Any) -> Any:
    """A quant spec (or any nested mapping of them) without its method keys."""
    if isinstance(spec, dict):
        return {k: _grid(v) for k, v in spec.items() if k not in METHOD_KEYS and k != "name"}
    return spec


def grid_key(config: dict[str, Any], metric: str) -> str | None:
    """What a run and its PTQ counterpart share (a canonical JSON string); None for a float run."""
    quant = config.get("quant") or {}
    if quant.get("weight") is None and quant.get("activation") is None:
        return None
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in LOADER_KEYS}
    key = {
        "task": config.get("task"),
        "metric": metric,
        "model": config.get("model"),
        "data": data,
        "quant": {k: _grid(quant.get(k)) for k in ("weight", "activation", "overrides", "attention")}
        | {k: quant.get(k) for k in ("include", "exclude")},
    }
    return json.dumps(key, sort_keys=True, default=str)


def degradation(baseline: float | None, quantized: float | None, higher_is_better: bool) -> float | None:
    """Loss of the quantized model against float, positive = worse."""
    if baseline is None or quantized is None:
        return None
    return baseline - quantized if higher_is_better else quantized - baseline


def recovery(ptq_degradation: float, qat_degradation: float) -> float | None:
    """The share of PTQ's degradation that QAT removes; None when PTQ lost nothing (nothing to recover)."""
    if ptq_degradation <= 0:
        return None
    return (ptq_degradation - qat_degradation) / ptq_degradation


def pair(records: list[Any]) -> None:
    """Set ``recovery`` and ``ptq_run`` on every finished QAT record that has a PTQ counterpart.

    ``records``: :class:`qat.report.collect.RunRecord` (status, mode, grid, degradation, name).
    """
    best: dict[str, Any] = {}
    for r in records:
        if r.status == "ok" and r.mode == "ptq" and r.grid and r.degradation is not None:
            if r.grid not in best or r.degradation < best[r.grid].degradation:
                best[r.grid] = r
    for r in records:
        ref = best.get(r.grid) if r.status == "ok" and r.mode == "qat" and r.grid else None
        if ref is None or r.degradation is None:
            continue
        r.recovery = recovery(ref.degradation, r.degradation)
        r.ptq_run = ref.name if r.recovery is not None else ""
