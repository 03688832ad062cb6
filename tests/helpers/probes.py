"""Callbacks that record what a training run did, for tests that run the job in-process or as ``qat-train``.

Add one to a run with Hydra overrides (:func:`record_train_starts`); it appends to a file, so it works in a
subprocess and across the several trainers of one job (float phase, QAT phase).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch


class TrainStarts(L.Callback):
    """Appends ``[phase, global_step]`` to ``path`` (one JSON line) when a fit starts training: after
    Lightning restored a checkpoint, so a resumed fit records the checkpoint's step and a fresh one 0.
    ``phase`` is the checkpoint directory's name ("float" or "qat")."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        phase = os.path.basename(str(cb.dirpath)) if cb is not None else ""
        with self.path.open("a") as f:
            f.write(json.dumps([phase, trainer.global_step]) + "\n")


def record_train_starts(path: Path) -> list[str]:
    """Hydra overrides that add :class:`TrainStarts` writing to ``path``."""
    return [
        "+callbacks.train_starts._target_=helpers.probes.TrainStarts",
        f"+callbacks.train_starts.path={path}",
    ]


def train_starts(path: Path) -> list[tuple[Any, ...]]:
    """What :class:`TrainStarts` recorded, in order (empty if nothing trained)."""
    if not path.exists():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def saved_by_autograd(fn: Callable[[], Any]) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward pass of what ``fn()`` computes (saved-tensor hooks)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved
