"""Fault injection for the resume tests: stop a run at an exact step, the way a crash or a scheduler would."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the job catches it and no checkpoint is written for it."""


class KillAt(L.Callback):
    """At the end of optimizer step ``step`` of ``phase`` ("float" or "qat"): raise :class:`Killed`, or send
    the process SIGKILL / SIGTERM (``how``). Runs before that step's checkpoint is saved (Lightning puts
    checkpoint callbacks last), so the newest checkpoint on disk is an older one, as after a real kill."""

    def __init__(self, step: int, phase: str = "qat", how: str = "raise") -> None:
        self.step, self.phase, self.how = step, phase, how

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        cb = trainer.checkpoint_callback
        phase = os.path.basename(str(cb.dirpath)) if cb is not None else ""
        if phase != self.phase or trainer.global_step != self.step:
            return
        if self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise Killed(f"killed at {self.phase} step {self.step}")


class PoisonAt(L.Callback):
    """Fills the first parameter of the model with ``value`` at optimizer step ``step`` of ``phase``: before
    the step (``when="start"``: that step's loss is non-finite, as in a diverging run) or after it
    (``when="end"``: the loss was finite but the weights are not, as after an overflowing update)."""

    def __init__(
        self, step: int, value: float = float("nan"), phase: str = "qat", when: str = "start"
    ) -> None:
        self.step, self.value, self.phase, self.when = step, value, phase, when

    def _poison(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        cb = trainer.checkpoint_callback
        phase = os.path.basename(str(cb.dirpath)) if cb is not None else ""
        if phase == self.phase and step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(self.value)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.when == "start":
            self._poison(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.when == "end":
            self._poison(trainer, pl_module, trainer.global_step - 1)
