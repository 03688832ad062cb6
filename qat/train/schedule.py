"""The QAT schedule as a Lightning callback: float warm-up, observer freezing, BatchNorm freezing and
bit-width annealing.

Everything is a function of ``trainer.global_step``, and the flags and widths it sets live in quantizer
buffers, so a resumed run lands in exactly the same phase (a frozen observer stays frozen, an annealed
layer keeps its width) without extra bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import nn

from qat.quant.quantizer import FakeQuantizer


class QATSchedule(L.Callback):
    """Applies the schedule before every training batch.

    ``float_warmup_steps``: fake quantization off (observers still record) for the first N steps.
    ``freeze_observers_step``: observers (and observer-driven scales) frozen from step M on.
    ``freeze_bn_step``: BatchNorm running statistics frozen (BN in eval mode) from step K on.
    ``bits``: bit-width annealing of int weight quantizers, ``[[step, bits], ...]`` (e.g. ``[[0, 8], [100, 4],
    [200, 2]]``). The quant config holds the final width; from each listed step on a quantizer runs at
    ``max(its configured width, bits)``, so layers kept at 8 bit stay there and the rest go 8 -> 4 -> 2.
    ``activation_bits``: the same for int activation quantizers.
    ``None`` disables a stage.
    """

    def __init__(
        self,
        float_warmup_steps: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        bits: Sequence[Sequence[int]] | None = None,
        activation_bits: Sequence[Sequence[int]] | None = None,
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
        self.bits = _bit_schedule("schedule.bits", bits)
        self.activation_bits = _bit_schedule("schedule.activation_bits", activation_bits)

    def phase(self, step: int) -> dict[str, bool]:
        """What the schedule wants at ``step``: the single source of truth for every flag."""
        return {
            "fake_quant": step >= self.float_warmup_steps,
            "observers": self.freeze_observers_step is None or step < self.freeze_observers_step,
            "bn_frozen": self.freeze_bn_step is not None and step >= self.freeze_bn_step,
        }

    def bits_at(self, step: int) -> dict[str, int | None]:
        """Scheduled minimum width for weights and activations at ``step`` (None: the configured width)."""
        return {"weight": _lookup(self.bits, step), "activation": _lookup(self.activation_bits, step)}

    def apply(self, model: nn.Module, step: int) -> dict[str, bool]:
        want = self.phase(step)
        floor = self.bits_at(step)
        annealed = {"weight": self.bits is not None, "activation": self.activation_bits is not None}
        for m in model.modules():
            if isinstance(m, FakeQuantizer):
                if m.fake_quant_on != want["fake_quant"]:
                    m.enable_fake_quant(want["fake_quant"])
                if m.observer is not None and m.observer_on != want["observers"]:
                    m.enable_observer(want["observers"])
                if annealed[m.role] and m.target_bits is not None:
                    width = max(m.target_bits, floor[m.role] or 0)
                    if m.bits != width:  # only on a change: set_bits rescales the quantizer's state
                        m.set_bits(width)
            elif want["bn_frozen"] and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()  # Lightning puts modules back in train mode each epoch: re-applied every batch
        return want

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        want: dict[str, Any] = dict(self.apply(pl_module, step))
        want.update({f"{role}_bits": b for role, b in self.bits_at(step).items() if b is not None})
        pl_module.log_dict({f"schedule/{k}": float(v) for k, v in want.items()}, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "float_warmup_steps": self.float_warmup_steps,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
            "bits": self.bits,
            "activation_bits": self.activation_bits,
        }


def _bit_schedule(key: str, value: Sequence[Sequence[int]] | None) -> list[list[int]] | None:
    """Validate ``[[step, bits], ...]``: steps >= 0 and increasing, bits 2..8 (one-line errors)."""
    if value is None:
        return None
    allowed = "a list of [step, bits] pairs with increasing steps >= 0 and bits 2..8, or null"
    try:
        pairs = [[entry[0], entry[1]] for entry in value if len(entry) == 2]
    except TypeError:
        raise ValueError(f"{key}: {value!r} is not valid; allowed: {allowed}") from None
    ok = len(pairs) == len(value) and len(pairs) > 0
    for i, (step, bits) in enumerate(pairs):
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in (step, bits))
        ok = ok and step >= 0 and 2 <= bits <= 8 and (i == 0 or step > pairs[i - 1][0])
    if not ok:
        raise ValueError(f"{key}: {value!r} is not valid; allowed: {allowed}")
    return [[int(s), int(b)] for s, b in pairs]


def _lookup(schedule: list[list[int]] | None, step: int) -> int | None:
    """The bits of the last entry at or before ``step`` (None before the first entry)."""
    current = None
    for start, bits in schedule or []:
        if step >= start:
            current = bits
    return current
