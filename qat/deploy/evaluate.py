"""Before/after evaluation shared by ``qat-eval`` and ``scripts/bench_export.py``: primary metric, size and
latency (median of repeated runs after warm-up) for float, fake-quant and exported models.

Size is :mod:`qat.size`'s definition (the bytes of the model's tensors as stored); file size, where a model
has a file, is reported beside it and labelled as such.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qat.tasks import TASKS

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalRow:
    """One model of the comparison; latencies are milliseconds per batch keyed by batch size.

    ``size_bytes``: tensor bytes (:mod:`qat.size`); ``file_bytes``: the model's file on disk, if it has one.
    """

    name: str
    metric: float
    size_bytes: int | None
    file_bytes: int | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        return d


@torch.inference_mode()
def primary_metric(predict: Predict, batches: Iterable[Any], task: str) -> float:
    """Accuracy (classification) or perplexity (lm) of ``predict`` over ``(inputs, targets)`` batches."""
    correct = total = 0
    nll = 0.0
    for x, y in batches:
        out = predict(x).float()
        if task == "lm":
            nll += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
            total += y.numel()
        else:
            correct += int((out.argmax(-1) == y).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("no evaluation batches")
    return math.exp(nll / total) if task == "lm" else correct / total


@torch.inference_mode()
def latency_ms(predict: Predict, x: torch.Tensor, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time of ``predict(x)`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def batch_of(batches: list[Any], size: int) -> torch.Tensor:
    """``size`` inputs taken from the evaluation batches (repeated if there are fewer)."""
    xs = torch.cat([b[0] for b in batches])
    reps = -(-size // xs.shape[0])
    return xs.repeat(reps, *([1] * (xs.dim() - 1)))[:size].contiguous()


def evaluate_rows(
    models: dict[str, tuple[Predict, int | None, int | None]],
    batches: list[Any],
    task: str,
    batch_sizes: tuple[int, ...] = (1, 64),
    warmup: int = 5,
    repeats: int = 30,
) -> list[EvalRow]:
    """Metric and latency of every model on the same batches and the same timing inputs.

    ``models``: ``{name: (predict, size bytes, file bytes)}`` (either size may be None).
    """
    rows = []
    inputs = {bs: batch_of(batches, bs) for bs in batch_sizes}
    for name, (predict, size, file_bytes) in models.items():
        row = EvalRow(name, primary_metric(predict, batches, task), size, file_bytes)
        for bs, x in inputs.items():
            row.latency_ms[bs] = latency_ms(predict, x, warmup, repeats)
        rows.append(row)
    return rows


def format_table(rows: list[EvalRow], task: str) -> str:
    """The printed before/after table, with a line saying what the two size columns are."""
    metric = TASKS[task].metric
    sizes = sorted({bs for r in rows for bs in r.latency_ms})
    head = f"{'model':24s} {metric:>9s} {'size (B)':>11s} {'file (B)':>11s} "
    head += " ".join(f"{f'ms@bs{bs}':>10s}" for bs in sizes)
    lines = [head, "-" * len(head)]
    for r in rows:
        size, file = (f"{n:,d}" if n is not None else "-" for n in (r.size_bytes, r.file_bytes))
        lat = " ".join(f"{r.latency_ms.get(bs, float('nan')):10.3f}" for bs in sizes)
        lines.append(f"{r.name:24s} {r.metric:9.4f} {size:>11s} {file:>11s} {lat}")
    lines.append("size: bytes of the tensors as stored (fake-quant: as exported); file: bytes on disk")
    return "\n".join(lines)
