"""The deploy benchmarks' model: a residual FFN stack (issue 14), float and W8A8-prepared.

``blocks`` blocks ``x + fc2(relu(fc1(x)))`` of width ``d`` and hidden width ``hidden``, then a linear head.
:func:`ffn_w8a8` prepares a copy with the packaged ``w8a8`` quant config (per-channel int8 weights, static
per-tensor int8 activations) and calibrates it on random batches, like ``qat.prepare`` + ``qat.calibrate``
in a user's script. Imported by the benchmark scripts (``from _ffn import ...`` with ``scripts/`` on the
path).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import qat


class Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class FFNStack(nn.Module):
    def __init__(self, d: int = 768, hidden: int = 3072, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d, hidden) for _ in range(blocks)))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def batches(d: int = 768, n: int = 8, batch: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Random ``(inputs, labels)`` batches for calibration and verification."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, d, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)
    ]


def ffn_float(d: int = 768, hidden: int = 3072, blocks: int = 4, seed: int = 0) -> FFNStack:
    torch.manual_seed(seed)
    return FFNStack(d, hidden, blocks).eval()


def ffn_w8a8(float_model: nn.Module, cal: list[Any], quant: str = "w8a8") -> nn.Module:
    """A prepared, calibrated copy of ``float_model`` (quant config ``quant``), in eval mode."""
    m = qat.prepare(copy.deepcopy(float_model), quant)
    qat.calibrate(m, cal)
    return m.eval()
