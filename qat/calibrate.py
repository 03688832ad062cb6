"""Calibration: run a few batches through a prepared model with observers on and nothing else changing.

The model stays in eval mode (BatchNorm statistics and dropout untouched) while the quantizers are put in
training mode, which is what lets activation observers record ranges and learned scales initialise.
Used before QAT (so learned scales start from data, before the optimizer and DDP see them) and as PTQ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat.quant.quantizer import FakeQuantizer


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
) -> int:
    """Feed up to ``num_batches`` batches; returns how many were used. Restores every module's mode."""
    modes = {m: m.training for m in model.modules()}
    observing = {m: m._obs_on for m in model.modules() if isinstance(m, FakeQuantizer)}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    for m in observing:
        m.train()
        m.enable_observer(True)
    n = 0
    try:
        for batch in batches:
            if num_batches is not None and n >= num_batches:
                break
            forward(model, _to_device(batch, device))
            n += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, on in observing.items():  # a frozen observer stays frozen (the schedule owns the flags)
            m.enable_observer(on)
    return n


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
