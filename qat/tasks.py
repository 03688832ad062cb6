"""The task registry: ``{name: Task}``, what each training task is, as data.

A task names the LightningModule that trains it and owns its loss, its primary metric and which way is
better, the shape its model outputs, what a distillation may set, and what the export check compares.
The job, the data check, the reports and the export verification read it here; a new task is one entry.
No Lightning import: ``qat-report`` and the exporter read it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: logits [B, C] or [B, T, V], targets [B] or [B, T]."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


class Output(NamedTuple):
    """A model output of ``dims`` dimensions, the last one the datamodule's ``size`` (counting ``unit``)."""

    dims: int
    size: str
    unit: str


@dataclass(frozen=True)
class Task:
    """One training task.

    ``module``: the LightningModule class that trains it (dotted path: imported by the job only).
    ``loss``: ``loss(output, targets)``; None where the only loss is the distillation term.
    ``metric`` / ``higher_is_better``: the primary metric (``val/<metric>``, ``test/<metric>``) that
    ``metrics.json``, reports and sweeps rank runs by.
    ``verify``: what the export check compares (:mod:`qat.deploy.verify`): "top1" (top-1 agreement 100%
    and logits within tolerance), "perplexity" (equal to 4 significant digits); None: the job does not
    export the task (its reloads are scored by the task metric instead, e.g. ``scripts/bench_minilm.py``).
    ``output``: the model output the data check expects (None: not checked).
    ``distill_kinds`` / ``distill_fields``: the ``distill`` kinds (the first is the default) and keys the
    task reads (:class:`qat.train.distill.DistillConfig`).
    ``self_distill``: the teacher is a frozen copy of the model as built, and that copy is the baseline
    (no float training).
    """

    module: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    metric: str
    higher_is_better: bool
    verify: str | None
    output: Output | None = None
    distill_kinds: tuple[str, ...] = ("kl", "mse")
    distill_fields: tuple[str, ...] = ("weight", "kind", "temperature")
    self_distill: bool = False


# fmt: off
TASKS: dict[str, Task] = {
    "classification": Task(
        module="qat.train.module.QATModule", loss=cross_entropy, metric="acc", higher_is_better=True,
        verify="top1", output=Output(2, "num_classes", "classes"),
    ),
    "lm": Task(
        module="qat.train.module.QATModule", loss=cross_entropy, metric="ppl", higher_is_better=False,
        verify="perplexity", output=Output(3, "vocab_size", "tokens"),
    ),
    # A sentence encoder learns its own float embeddings (mean cosine to the teacher: 1.0 at the start).
    "embed_distill": Task(
        module="qat.train.embed.EmbedDistillModule", loss=None, metric="cosine", higher_is_better=True,
        verify=None, distill_kinds=("cosine", "mse"), distill_fields=("kind", "hidden_weight"),
        self_distill=True,
    ),
    # A pretrained causal LM (Hugging Face, ``model(ids).logits``) learns its float self's next-token
    # distributions, optionally mixed with the data's cross-entropy (qat.train.lm_distill).
    "causal_lm": Task(
        module="qat.train.lm_distill.CausalLMModule", loss=cross_entropy, metric="ppl",
        higher_is_better=False, verify="perplexity", distill_kinds=("kl",), self_distill=True,
    ),
}
# fmt: on
