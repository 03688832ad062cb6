"""The LightningModules that train a (prepared or float) model for a task of :data:`qat.tasks.TASKS`.

:class:`TaskModule` is what every task shares: the model and its frozen teacher (kept out of checkpoints
and in eval mode), the optimizer with its parameter groups and learning-rate schedule, the training and
evaluation steps and their logs. :class:`QATModule` trains the logit tasks (``classification``: batches
``(x, y)``, accuracy; ``lm``: batches of token ids ``(inputs, targets)``, perplexity), optionally distilled
from a teacher. The same module trains the float baseline and the QAT model, so the two phases differ
only in the model they are given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from qat.quant.quantizer import COMPILE_OPTIONS, FakeQuantizer
from qat.tasks import TASKS
from qat.train.distill import DistillConfig, distillation_loss

SCHEDULERS = ("cosine", "constant")
STAGES = ("val", "test")


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


class TaskModule(L.LightningModule):
    """Trains ``model`` for ``task``; ``teacher``: a frozen float model for distillation (``distill``).

    ``optimizer``: a partial optimizer (Hydra ``_partial_: true``) called with the parameter groups.
    ``scale_lr_mult``: learning-rate multiplier for quantizer parameters.
    ``scheduler``: "cosine" (with ``warmup_steps`` linear warm-up, down to 10%) or "constant".
    ``distill``: a :class:`DistillConfig` or its mapping, checked against the task.
    ``compile``: training steps call the model through ``torch.compile`` (:meth:`run_model`).
    A subclass says which metrics a stage has (``build_metrics``) and computes ``train_loss``/``eval_loss``.
    """

    default_lr = 1e-3

    def __init__(
        self,
        model: nn.Module,
        task: str,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scale_lr_mult: float = 1.0,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        teacher: nn.Module | None = None,
        distill: Any = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        path = f"{type(self).__module__}.{type(self).__qualname__}"
        allowed = [name for name, t in TASKS.items() if t.module == path]
        if task not in allowed:
            raise ValueError(f"task: {task!r} is not valid; allowed: {', '.join(allowed)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler: {scheduler!r} is not valid; allowed: {', '.join(SCHEDULERS)}")
        self.task = TASKS[task]
        if self.task.self_distill and teacher is None:
            raise ValueError(f"task {task} needs a teacher (the float model)")
        if teacher is model:
            raise ValueError("teacher: must be a separate (frozen) copy of the model, not the model itself")
        self.distill = DistillConfig.from_dict(distill, task)
        self.save_hyperparameters(ignore=["model", "teacher", "optimizer", "distill"])
        self.hparams["distill"] = dataclasses.asdict(self.distill)
        self.model = model
        # Kept out of the module tree (so out of the state dict): the compiled wrapper of ``model``.
        self.__dict__["_compiled"] = torch.compile(model, options=COMPILE_OPTIONS) if compile else None
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=self.default_lr)
        self.metrics = nn.ModuleDict({stage: nn.ModuleDict(self.build_metrics()) for stage in STAGES})

    def build_metrics(self) -> dict[str, torchmetrics.Metric]:
        """This task's metrics (one set per stage), the primary one (``task.metric``) among them."""
        raise NotImplementedError

    def run_model(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in training mode through ``torch.compile`` when ``compile`` is set (it
        recompiles when the QAT schedule flips a quantizer's flags). Evaluation stays eager: the layers'
        integer path, what export deploys."""
        compiled = self.__dict__["_compiled"]
        return (compiled if compiled is not None and self.training else self.model)(*args, **kwargs)

    def train_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its parts worth logging (``train/<name>``)."""
        raise NotImplementedError

    def eval_loss(self, batch: Any, metrics: nn.ModuleDict) -> torch.Tensor:
        """The evaluation loss of ``batch``, after updating ``metrics`` with it."""
        raise NotImplementedError

    # The teacher is not part of the checkpoint (it is the float model, rebuilt by the job), and it stays
    # in eval mode even when Lightning switches the module to training.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.teacher is not None:
            state_dict = dict(state_dict)
            state_dict.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> TaskModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps each module's mode, and transformers' from_pretrained returns models in eval mode:
        # without this the student would train in eval mode (activation observers would never update).
        self.train()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, parts = self.train_loss(batch)
        for name, value in parts.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        metrics = self.metrics[stage]
        loss = self.eval_loss(batch, metrics)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        for name, metric in metrics.items():
            self.log(
                f"{stage}/{name}", metric, on_epoch=True, prog_bar=stage == "val" and name == self.task.metric
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

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

    @classmethod
    def data_kwargs(cls, datamodule: Any) -> dict[str, Any]:
        """Constructor arguments the job takes from the datamodule."""
        return {}


# The primary metrics of the logit tasks, by name, given the number of classes; both take float logits.
METRICS: dict[str, Callable[[int], torchmetrics.Metric]] = {
    "acc": lambda n: torchmetrics.Accuracy(task="multiclass", num_classes=n),
    "ppl": lambda n: torchmetrics.text.Perplexity(),
}


class QATModule(TaskModule):
    """The logit tasks: ``loss = task.loss(logits, targets)``, mixed as ``(1-w)·loss + w·KD`` with a teacher
    and ``distill.weight`` w > 0. ``num_classes``: the classifier's classes (accuracy); ``kw``: the
    arguments of :class:`TaskModule`."""

    def __init__(
        self, model: nn.Module, task: str = "classification", num_classes: int | None = None, **kw: Any
    ) -> None:
        self.num_classes = int(num_classes or 10)
        super().__init__(model, task, **kw)

    @classmethod
    def data_kwargs(cls, datamodule: Any) -> dict[str, Any]:
        return {"num_classes": getattr(datamodule, "num_classes", None)}

    def build_metrics(self) -> dict[str, torchmetrics.Metric]:
        return {self.task.metric: METRICS[self.task.metric](self.num_classes)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = self.run_model(x)
        loss = self.task.loss(logits, y)
        w = self.distill.weight
        if self.teacher is None or w <= 0:
            return loss, {}
        with torch.no_grad():
            t_logits = self.teacher(x)
        kd = distillation_loss(logits, t_logits, str(self.distill.kind), self.distill.temperature)
        return (1 - w) * loss + w * kd, {"distill": kd}

    def eval_loss(self, batch: Any, metrics: nn.ModuleDict) -> torch.Tensor:
        x, y = batch
        logits = self.run_model(x)
        metrics[self.task.metric].update(logits.float(), y)
        return self.task.loss(logits, y)
