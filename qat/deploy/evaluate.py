"""Before/after evaluation shared by ``qat-eval``, the end of ``qat-train`` and the benchmark scripts: primary
metric, size and latency (median of repeated runs after warm-up) for the float model, the fake-quant model
and every export target written (each run by its engine: :data:`qat.deploy.registry.TARGETS`).

Size is :mod:`qat.size`'s definition (the bytes of the model's tensors as stored); file size, where a model
has a file, is reported beside it and labelled as such (a target that writes a directory: its files).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.deploy.registry import NATIVE, TARGETS
from qat.deploy.verify import logits_of
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
    """The primary metric of ``task`` (:data:`qat.tasks.TASKS`) of ``predict`` over ``(inputs, targets)``
    batches: perplexity (``lm``, ``causal_lm``) or accuracy."""
    from qat.tasks import TASKS

    ppl = TASKS[task].metric == "ppl"
    correct = total = 0
    nll = 0.0
    for x, y in batches:
        out = logits_of(predict(x)).float()
        if ppl:
            nll += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
            total += y.numel()
        else:
            correct += int((out.argmax(-1) == y).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("no evaluation batches")
    return math.exp(nll / total) if ppl else correct / total


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


def run_native(path: Path, skeleton: nn.Module, threads: int | None) -> Predict:
    """The native target's engine: the integer runtime (:func:`qat.deploy.load_quantized`)."""
    from qat.deploy.loader import load_quantized

    return load_quantized(path.parent, skeleton)


def run_onnx(path: Path, skeleton: nn.Module, threads: int | None) -> Predict:
    """The ONNX target's engine: an onnxruntime session."""
    from qat.deploy.onnx import onnx_session_forward

    return onnx_session_forward(path, threads=threads)


def file_bytes(path: Path) -> int:
    """Bytes on disk of a target's file, or of every file in the directory a target writes."""
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def target_models(export: Path, skeleton: nn.Module, threads: int | None = None) -> dict[str, tuple]:
    """``{label: (predict, size bytes, file bytes)}`` for every target present in the export directory
    ``export``, each loaded by its engine into a copy of the float ``skeleton`` (size: the native target's
    tensor payload, :mod:`qat.size`; None for the others)."""
    from qat.size import safetensors_payload_bytes

    models: dict[str, tuple] = {}
    for name, target in TARGETS.items():
        path = export / target.file
        if not path.exists():
            continue
        predict = target.runner()(path, copy.deepcopy(skeleton), threads)
        if predict is None:
            print(f"note: {path} is not timed: its engine is not installed ({name})")
            continue
        size = safetensors_payload_bytes(path) if name == NATIVE else None
        models[target.label] = (predict, size, file_bytes(path))
    return models


def compare(
    float_model: nn.Module,
    fake_quant: nn.Module,
    export: Path | None,
    batches: list[Any],
    task: str,
    batch_sizes: tuple[int, ...] = (1, 64),
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> list[EvalRow]:
    """The before/after rows: float, fake quant (size: as exported) and every target in ``export``."""
    from qat.rewrite import unprepare
    from qat.size import float_size_bytes, quantized_size_bytes

    models: dict[str, tuple] = {
        "float": (float_model.eval(), float_size_bytes(float_model), None),
        "fake-quant": (fake_quant.eval(), quantized_size_bytes(fake_quant), None),
    }
    if export is not None:
        models.update(target_models(export, unprepare(copy.deepcopy(fake_quant)), threads))
    return evaluate_rows(models, batches, task, batch_sizes, warmup, repeats)


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
