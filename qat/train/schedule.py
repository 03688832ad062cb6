"""The QAT schedule as a Lightning callback: float warm-up, observer freezing, BatchNorm freezing.

Everything is a function of ``trainer.global_step``, and the flags it sets live in quantizer buffers, so a
resumed run lands in exactly the same phase (a frozen observer stays frozen) without extra bookkeeping.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from qat.quant.quantizer import FakeQuantizer


class QATSchedule(L.Callback):
    """Applies the schedule before every training batch.

    ``float_warmup_steps``: fake quantization off (observers still record) for the first N steps.
    ``freeze_observers_step``: observers (and observer-driven scales) frozen from step M on.
    ``freeze_bn_step``: BatchNorm running statistics frozen (BN in eval mode) from step K on.
    ``None`` disables a stage.
    """

    def __init__(
        self,
        float_warmup_steps: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
    ) -> None:
        for key, value in (
            ("schedule.float_warmup_steps", float_warmup_steps),
            ("schedule.freeze_observers_step", freeze_observers_step),
            ("schedule.freeze_bn_step", freeze_bn_step),
        ):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{key}: {value!r} is not valid; allowed: a step number >= 0, or null")
        self.float_warmup_steps = float_warmup_steps
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step

    def phase(self, step: int) -> dict[str, bool]:
        """What the schedule wants at ``step``: the single source of truth for every flag."""
        return {
            "fake_quant": step >= self.float_warmup_steps,
            "observers": self.freeze_observers_step is None or step < self.freeze_observers_step,
            "bn_frozen": self.freeze_bn_step is not None and step >= self.freeze_bn_step,
        }

    def apply(self, model: nn.Module, step: int) -> dict[str, bool]:
        want = self.phase(step)
        for m in model.modules():
            if isinstance(m, FakeQuantizer):
                if m._fq_on != want["fake_quant"]:
                    m.enable_fake_quant(want["fake_quant"])
                if m.observer is not None and m._obs_on != want["observers"]:
                    m.enable_observer(want["observers"])
            elif want["bn_frozen"] and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()  # Lightning puts modules back in train mode each epoch: re-applied every batch
        return want

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        want = self.apply(pl_module, trainer.global_step)
        pl_module.log_dict({f"schedule/{k}": float(v) for k, v in want.items()}, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "float_warmup_steps": self.float_warmup_steps,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
        }
