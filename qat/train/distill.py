"""Distillation from a frozen float teacher: the ``distill`` config and its losses.

Logit tasks (``classification``, ``lm``): loss = (1 - weight) · task loss + weight · KD, where KD is the
KL divergence of temperature-softened logits (``kind: kl``) or the MSE of the logits (``kind: mse``).
Self-distillation (``embed_distill``): loss = embedding loss (``kind``: cosine or mse) + hidden_weight ·
MSE of the per-layer hidden states. Which kinds and keys a task reads is in its registry entry
(:data:`qat.tasks.TASKS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qat.tasks import TASKS
from qat.train.checks import JobConfigError


@dataclass(frozen=True)
class DistillConfig:
    """The ``distill`` node: numbers and strings (a Hydra structured config); ``kind`` None: the task's."""

    weight: float = 0.0
    kind: str | None = None
    temperature: float = 1.0
    hidden_weight: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | DistillConfig | None, task: str) -> DistillConfig:
        """The checked config of ``task`` (``d`` None: no distillation). A key the task does not read, unless
        left at its default, an unknown kind or a value out of range is a :class:`JobConfigError` line."""
        if isinstance(d, DistillConfig):
            d = dataclasses.asdict(d)
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise JobConfigError(f"distill: {d!r} is not valid; allowed: a mapping of distill keys, or null")
        spec = TASKS[task]
        defaults = dataclasses.asdict(cls())
        for key, value in d.items():
            if key not in spec.distill_fields and (key not in defaults or value != defaults[key]):
                raise JobConfigError(
                    f"distill.{key}: unknown field; allowed for {task}: {', '.join(spec.distill_fields)}"
                )
        kind = d.get("kind") or spec.distill_kinds[0]
        if kind not in spec.distill_kinds:
            raise JobConfigError(
                f"distill.kind: {kind!r} is not valid; allowed: {', '.join(spec.distill_kinds)}"
            )
        numbers = {key: _number(key, d.get(key, defaults[key])) for key in RANGES}
        return cls(kind=str(kind), **numbers)


# The numeric keys: the values each allows, and how the error says it.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "weight": (lambda v: 0.0 <= v <= 1.0, "0 <= value <= 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "hidden_weight": (lambda v: v >= 0, ">= 0"),
}


def _number(key: str, value: Any) -> float:
    ok, allowed = RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobConfigError(f"distill.{key}: {value!r} is not valid; allowed: a number {allowed}")
    if not ok(float(value)):
        raise JobConfigError(f"distill.{key}: {value!r} is not valid; allowed: {allowed}")
    return float(value)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) on softened logits (scaled by T^2), or MSE between the logits."""
    s, t = student.flatten(0, -2).float(), teacher.flatten(0, -2).float()
    if kind == "mse":
        return F.mse_loss(s, t)
    log_p = F.log_softmax(s / temperature, dim=-1)
    log_q = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: mean of 1 - cos(s, t); ``mse``: mean squared distance ||s - t||² per sentence."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return (s - t).pow(2).sum(dim=-1).mean()


def hidden_state_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
) -> torch.Tensor:
    """MSE between matching hidden states over real tokens (padding ignored), averaged over layers."""
    mask = attention_mask.unsqueeze(-1).float()
    denom = mask.sum() * student[0].shape[-1]
    losses = [
        ((hs.float() - ht.float()).pow(2) * mask).sum() / denom
        for hs, ht in zip(student, teacher, strict=True)
    ]
    return torch.stack(losses).mean()
