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

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.utilities import dim_zero_cat

from qat.train.module import param_groups

LOSSES = ("cosine", "mse")


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


class EmbedDistillModule(L.LightningModule):
    """Trains ``model`` to match the frozen float ``teacher``'s sentence embeddings.

    ``model`` / ``teacher``: ``forward(input_ids, attention_mask, output_hidden_states=False)`` returning
    embeddings ``[B, D]`` (or ``(embeddings, hidden_states)``), e.g. :class:`qat.hf.models.SentenceEncoder`.
    ``distill``: ``{"kind": "cosine"|"mse", "hidden_weight": w}``; loss = embedding loss + w · hidden loss.
    Optimizer, ``scale_lr_mult``, ``scheduler`` and ``warmup_steps`` mean what they mean for ``QATModule``.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scale_lr_mult: float = 1.0,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        distill: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if teacher is None:
            raise ValueError("task embed_distill needs a teacher (the float model)")
        if teacher is model:
            raise ValueError("teacher: must be a separate (frozen) copy of the model, not the model itself")
        if scheduler not in ("cosine", "constant"):
            raise ValueError(f"optim.scheduler: {scheduler!r} is not valid; allowed: cosine, constant")
        distill = dict(distill or {})
        unknown = sorted(set(distill) - {"kind", "hidden_weight"})
        if unknown:
            raise ValueError(
                f"distill.{unknown[0]}: unknown field; allowed for embed_distill: kind, hidden_weight"
            )
        self.kind = str(distill.get("kind", "cosine"))
        if self.kind not in LOSSES:
            raise ValueError(f"distill.kind: {self.kind!r} is not valid; allowed: {', '.join(LOSSES)}")
        self.hidden_weight = float(distill.get("hidden_weight", 0.0))
        if self.hidden_weight < 0:
            raise ValueError(f"distill.hidden_weight: {self.hidden_weight!r} is not valid; allowed: >= 0")
        self.save_hyperparameters(ignore=["model", "teacher", "optimizer"])
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-4)
        self.metric_name = "cosine"
        self.val_cosine, self.test_cosine = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self.val_agreement, self.test_agreement = RetrievalAgreement(), RetrievalAgreement()

    # The teacher is not part of the checkpoint (it is the float model, rebuilt by the job), and it stays
    # in eval mode even when Lightning switches the module to training.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = dict(state_dict)
        state_dict.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> EmbedDistillModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps each module's mode, and transformers' from_pretrained returns models in eval mode:
        # without this the student would train in eval mode (activation observers would never update).
        self.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def _losses(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = batch
        hidden = self.hidden_weight > 0
        with torch.no_grad():
            t_out = self.teacher(ids, mask, output_hidden_states=hidden)
        s_out = self.model(ids, mask, output_hidden_states=hidden)
        (s, s_hid), (t, t_hid) = (s_out, t_out) if hidden else ((s_out, ()), (t_out, ()))
        emb = embedding_loss(s, t, self.kind)
        hid = hidden_state_loss(s_hid, t_hid, mask) if hidden else emb.new_zeros(())
        return emb + self.hidden_weight * hid, hid, s, t

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, hid, _, _ = self._losses(batch)
        if self.hidden_weight > 0:
            self.log("train/hidden", hid, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        loss, _, s, t = self._losses(batch)
        cosine = getattr(self, f"{stage}_cosine")
        agreement = getattr(self, f"{stage}_agreement")
        cosine.update(F.cosine_similarity(s.float(), t.float(), dim=-1))
        agreement.update(s, t)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/cosine", cosine, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/agreement", agreement, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        probe = self.optimizer_factory(params=[torch.zeros(1, requires_grad=True)])
        lr = float(probe.defaults["lr"])
        wd = float(probe.defaults.get("weight_decay", 0.0))
        opt = self.optimizer_factory(
            params=param_groups(self.model, wd, lr, float(self.hparams.scale_lr_mult))
        )
        if self.hparams.scheduler == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.hparams.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10%, as QATModule

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
