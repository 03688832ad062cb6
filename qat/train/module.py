"""``QATModule``: one LightningModule that trains any (prepared or float) model for a task.

Tasks: ``classification`` (batches ``(x, y)``, torchmetrics Accuracy) and ``lm`` (batches
``(inputs, targets)`` of token ids, torchmetrics Perplexity). The same module trains the float baseline
and the QAT model, so the two phases differ only in the model they are given.
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

from qat.quant.quantizer import FakeQuantizer

TASKS = ("classification", "lm")
# Primary metric per task and whether higher is better: what metrics.json and reports rank runs by.
# embed_distill is trained by qat.train.embed.EmbedDistillModule (mean cosine to the float teacher).
PRIMARY_METRIC = {"classification": ("acc", True), "lm": ("ppl", False), "embed_distill": ("cosine", True)}


class NonFiniteLossError(RuntimeError):
    """The training loss became inf/NaN; the message names the step and the last good checkpoint."""


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, scale_lr_mult: float
) -> list[dict[str, Any]]:
    """Three groups: decayed weights (>= 2-D), undecayed (biases, norms) and quantizer parameters.

    Quantizer parameters (learned scales, zero points, clipping levels) never get weight decay, which would
    shrink them towards 0 and collapse the grid, and may get their own learning rate.
    """
    quant_ids = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    decay, no_decay, quant = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in quant_ids:
            quant.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": quant, "weight_decay": 0.0, "lr": lr * scale_lr_mult, "name": "quant"},
    ]
    return [g for g in groups if g["params"]]


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


class QATModule(L.LightningModule):
    """Trains ``model`` for ``task``; optional distillation from a frozen ``teacher`` (the float model).

    ``optimizer``: a partial optimizer (Hydra ``_partial_: true``) called with the parameter groups.
    ``scale_lr_mult``: learning-rate multiplier for quantizer parameters.
    ``scheduler``: "cosine" (with ``warmup_steps`` linear warm-up) or "constant".
    ``distill``: ``{"weight": w, "kind": "kl"|"mse", "temperature": T}``; loss = (1-w)·task + w·distill.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "classification",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scale_lr_mult: float = 1.0,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        teacher: nn.Module | None = None,
        distill: dict[str, Any] | None = None,
        num_classes: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task: {task!r} is not valid; allowed: {', '.join(TASKS)}")
        if scheduler not in ("cosine", "constant"):
            raise ValueError(f"optim.scheduler: {scheduler!r} is not valid; allowed: cosine, constant")
        self.save_hyperparameters(ignore=["model", "teacher", "optimizer"])
        self.model = model
        self.task = task
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.distill = dict(distill or {})
        if task == "classification":
            n = int(num_classes or 10)
            self.val_metric = torchmetrics.Accuracy(task="multiclass", num_classes=n)
            self.test_metric = torchmetrics.Accuracy(task="multiclass", num_classes=n)
        else:
            self.val_metric = torchmetrics.text.Perplexity()
            self.test_metric = torchmetrics.text.Perplexity()
        self.metric_name = PRIMARY_METRIC[task][0]

    # The teacher is not part of this module's checkpoint: it is rebuilt from the float baseline.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.teacher is not None:
            state_dict = dict(state_dict)
            state_dict.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "lm":
            return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
        return F.cross_entropy(logits.float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self._task_loss(logits, y)
        if self.teacher is not None and float(self.distill.get("weight", 0.0)) > 0:
            w = float(self.distill["weight"])
            with torch.no_grad():
                t_logits = self.teacher(x)
            kd = distillation_loss(
                logits, t_logits, self.distill.get("kind", "kl"), float(self.distill.get("temperature", 1.0))
            )
            self.log("train/distill", kd, on_step=True, on_epoch=False)
            loss = (1 - w) * loss + w * kd
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> None:
        x, y = batch
        logits = self.model(x)
        loss = self._task_loss(logits, y)
        if self.task == "lm":
            metric.update(logits.float(), y)
        else:
            metric.update(logits.argmax(-1), y)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/{self.metric_name}", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metric)

    def configure_optimizers(self) -> Any:
        probe = self.optimizer_factory(params=[torch.zeros(1, requires_grad=True)])
        lr = float(probe.defaults["lr"])
        wd = float(probe.defaults.get("weight_decay", 0.0))
        groups = param_groups(self.model, wd, lr, float(self.hparams.scale_lr_mult))
        opt = self.optimizer_factory(params=groups)
        if self.hparams.scheduler == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.hparams.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10%

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
