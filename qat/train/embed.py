"""Task ``embed_distill``: a quantized sentence encoder learns to reproduce its float self.

The student (the prepared model) and the teacher (a frozen float copy made before ``prepare``) both map a
batch ``(input_ids, attention_mask)`` to unit-norm sentence embeddings. The loss pulls the student's
embedding onto the teacher's (cosine distance or squared distance), optionally plus an MSE between
their per-layer hidden states over real tokens. There are no labels, so the float baseline of this task
is the teacher itself: cosine 1.0 and retrieval agreement 1.0 by definition.

Metrics (validation and test): ``cosine``, the mean cosine similarity of student and teacher embeddings,
and ``agreement``, the share of sentences whose nearest neighbour among the whole split (cosine, itself
excluded) is the same sentence under the student as under the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.utilities import dim_zero_cat

from qat.train.distill import embedding_loss, hidden_state_loss
from qat.train.module import TaskModule


class RetrievalAgreement(torchmetrics.Metric):
    """Nearest-neighbour agreement between two embeddings of the same sentences (states gathered by DDP)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("student", default=[], dist_reduce_fx="cat")
        self.add_state("teacher", default=[], dist_reduce_fx="cat")

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self.student.append(F.normalize(student.detach().float(), dim=-1))
        self.teacher.append(F.normalize(teacher.detach().float(), dim=-1))

    @staticmethod
    def nearest(emb: torch.Tensor) -> torch.Tensor:
        """Index of each row's most similar other row."""
        sim = emb @ emb.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(dim=1)

    def compute(self) -> torch.Tensor:
        s, t = dim_zero_cat(self.student), dim_zero_cat(self.teacher)
        if s.shape[0] < 2:
            return torch.tensor(float("nan"))
        return (self.nearest(s) == self.nearest(t)).float().mean()


class EmbedDistillModule(TaskModule):
    """Trains ``model`` to match the frozen float ``teacher``'s sentence embeddings.

    ``model`` / ``teacher``: ``forward(input_ids, attention_mask, output_hidden_states=False)`` returning
    embeddings ``[B, D]`` (or ``(embeddings, hidden_states)``), e.g. :class:`qat.hf.models.SentenceEncoder`.
    ``distill``: ``{"kind": "cosine"|"mse", "hidden_weight": w}``; loss = embedding loss + w · hidden loss.
    ``kw``: the other arguments of :class:`TaskModule`.
    """

    default_lr = 1e-4

    def __init__(self, model: nn.Module, teacher: nn.Module, task: str = "embed_distill", **kw: Any) -> None:
        super().__init__(model, task, teacher=teacher, **kw)

    def build_metrics(self) -> dict[str, torchmetrics.Metric]:
        return {"cosine": torchmetrics.MeanMetric(), "agreement": RetrievalAgreement()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def _losses(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = batch
        hidden_weight = self.distill.hidden_weight
        hidden = hidden_weight > 0
        assert self.teacher is not None
        with torch.no_grad():
            t_out = self.teacher(ids, mask, output_hidden_states=hidden)
        s_out = self.run_model(ids, mask, output_hidden_states=hidden)
        (s, s_hid), (t, t_hid) = (s_out, t_out) if hidden else ((s_out, ()), (t_out, ()))
        emb = embedding_loss(s, t, str(self.distill.kind))
        hid = hidden_state_loss(s_hid, t_hid, mask) if hidden else emb.new_zeros(())
        return emb + hidden_weight * hid, hid, s, t

    def train_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, hid, _, _ = self._losses(batch)
        return loss, {"hidden": hid} if self.distill.hidden_weight > 0 else {}

    def eval_loss(self, batch: Any, metrics: nn.ModuleDict) -> torch.Tensor:
        loss, _, s, t = self._losses(batch)
        metrics["cosine"].update(F.cosine_similarity(s.float(), t.float(), dim=-1))
        metrics["agreement"].update(s, t)
        return loss


@torch.no_grad()
def embedding_metrics(
    student: nn.Module | Callable[..., torch.Tensor],
    teacher: nn.Module | Callable[..., torch.Tensor],
    batches: Any,
) -> dict[str, float]:
    """``{"cosine", "agreement", "n"}`` of ``student`` vs ``teacher`` over ``(ids, mask)`` batches.

    Outside Lightning: used to score an export reloaded in the integer runtime.
    """
    cos, agree, n = torchmetrics.MeanMetric(), RetrievalAgreement(), 0
    for ids, mask in batches:
        s, t = student(ids, mask), teacher(ids, mask)
        cos.update(F.cosine_similarity(s.float(), t.float(), dim=-1))
        agree.update(s, t)
        n += ids.shape[0]
    return {"cosine": float(cos.compute()), "agreement": float(agree.compute()), "n": n}
