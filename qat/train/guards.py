"""Training guards: stop on a non-finite loss before it reaches a checkpoint, and checkpoint on SIGTERM.

:class:`NonFiniteLossGuard` keeps the first bad step in a device tensor (no host sync per step), looks at
it every ``check_every_n_steps`` steps, and always before a checkpoint is written, so every checkpoint on
disk is finite and the error can name the last good one.

:class:`SigtermCheckpoint`: on SIGTERM (what schedulers send before a kill) Lightning finishes the current
batch and raises ``SIGTERMException``; this callback saves the phase's ``last.ckpt`` at that point, so
``resume=true`` continues from the very step the job was stopped at.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qat.train.module import NonFiniteLossError

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "SigtermCheckpoint"]


class NonFiniteLossGuard(L.Callback):
    """Stops training with :class:`NonFiniteLossError` once the training loss is inf/NaN.

    ``checkpoint_file``: the file the phase's checkpoints are written to (named in the error).
    ``check_every_n_steps``: how often the device-side flag is read (one host sync); a bad step is still
    reported exactly, and training stops at most N-1 steps later. Before every checkpoint save the flag
    and the parameters/buffers are checked, so a poisoned state is never written.
    """

    def __init__(self, checkpoint_file: str | Path | None = None, check_every_n_steps: int = 10) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise ValueError(
                f"guards.check_every_n_steps: {check_every_n_steps!r} is not valid; allowed: an integer >= 1"
            )
        if check_every_n_steps < 1:
            raise ValueError(
                f"guards.check_every_n_steps: {check_every_n_steps!r} is not valid; allowed: an integer >= 1"
            )
        self.checkpoint_file = Path(checkpoint_file) if checkpoint_file else None
        self.check_every_n_steps = check_every_n_steps
        self._bad_step: torch.Tensor | None = None  # -1 while every loss was finite
        self._bad_value: torch.Tensor | None = None
        self._step = 0
        self.last_good: tuple[str, int] | None = None  # (checkpoint path, global step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bad_step = self._bad_value = None
        if trainer.ckpt_path:  # resumed: the checkpoint we started from is the last good one so far
            self.last_good = (str(trainer.ckpt_path), trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float().reshape(())
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, self._step), self._bad_step)
        self._bad_value = torch.where(first, loss, self._bad_value)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check(trainer)
        bad = [k for k, v in checkpoint.get("state_dict", {}).items() if _non_finite(v)]
        if bad:
            raise NonFiniteLossError(
                f"training stopped at step {trainer.global_step}: {len(bad)} parameters/buffers became "
                f"non-finite (e.g. {bad[0]}) while the loss was finite; {self._last_good_text()}"
            )
        if self.checkpoint_file is not None:
            self.last_good = (str(self.checkpoint_file), trainer.global_step)

    def _check(self, trainer: L.Trainer) -> None:
        """Read the flag (the one host sync) and raise if any rank saw a non-finite loss."""
        local = int(self._bad_step) if self._bad_step is not None else -1
        anywhere = trainer.strategy.reduce_boolean_decision(local >= 0, all=False)
        if not anywhere:
            return
        if local >= 0:
            value = float(self._bad_value)  # type: ignore[arg-type]
            what = f"the training loss became non-finite ({value}) at step {local}"
            if trainer.global_step > local + 1:
                what += f" (seen at step {trainer.global_step})"
        else:
            what = f"the training loss became non-finite on another rank (seen at step {trainer.global_step})"
        raise NonFiniteLossError(
            f"training stopped: {what}; {self._last_good_text()}. Lower the learning rate or the scale "
            "learning rate (optim.scale_lr_mult), or raise the bit widths, then resume from that checkpoint"
        )

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint was saved in this phase before it"
        path, step = self.last_good
        return f"last good checkpoint: {path} (step {step})"


def _non_finite(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())


class SigtermCheckpoint(L.Callback):
    """Saves ``checkpoint_file`` when training is stopped by SIGTERM (Lightning raises after the batch)."""

    def __init__(self, checkpoint_file: str | Path) -> None:
        self.checkpoint_file = Path(checkpoint_file)
        self.saved_step: int | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        trainer.save_checkpoint(self.checkpoint_file, weights_only=False)
        self.saved_step = trainer.global_step
        log.warning("SIGTERM: saved %s at step %d", self.checkpoint_file, trainer.global_step)
