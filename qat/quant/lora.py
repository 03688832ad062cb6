"""QAT-LoRA: the prepared model's weights frozen, low-rank adapters trained, merged before export.

Each targeted linear layer's weight becomes ``W + (alpha / rank) · B A`` (a ``torch.nn.utils.parametrize``
parametrization: ``A [rank, in]`` Kaiming-uniform, ``B [out, rank]`` zeros, so training starts from the
prepared model), and its weight quantizer fake-quantizes that sum: the adapters learn through the same
straight-through grid the export uses, so merging (:func:`merge_lora`, the sum written into ``weight``)
changes no code. (torchtune's QAT-LoRA quantizes only ``W`` and adds the adapters' output in float; merged
and re-quantized, their correction would be rounded away on a 4-bit grid.) Every other parameter is frozen
except the quantizers' own (learned scales), which the optimizer's "quant" group still trains.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat.quant.quantizer import FakeQuantizer


@dataclass(frozen=True)
class LoRAConfig:
    """The ``lora`` node: ``rank`` 0 is off; ``targets``: globs of linear-layer names to adapt."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["*"])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LoRAConfig:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"lora.{sorted(unknown)[0]}: unknown field; allowed: rank, alpha, targets")
        cfg = cls(**d)
        if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 0:
            raise ValueError(f"lora.rank: {cfg.rank!r} is not valid; allowed: an integer >= 0 (0: off)")
        if not cfg.alpha > 0:
            raise ValueError(f"lora.alpha: {cfg.alpha!r} is not valid; allowed: a number > 0")
        targets = [cfg.targets] if isinstance(cfg.targets, str) else cfg.targets
        return dataclasses.replace(cfg, targets=[str(t) for t in targets])

    def trains(self, mode: str) -> bool:
        """Whether a run in ``mode`` trains adapters (QAT with a rank; PTQ trains nothing)."""
        return self.rank > 0 and mode == "qat"


class LowRankDelta(nn.Module):
    """The parametrization ``W -> W + scale · B A``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.B @ self.A).to(w.dtype) * self.scale


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze ``model`` but its quantizers and give the quantized linear layers matching ``cfg.targets``
    adapters; returns their names. A glob that matches none is a ``ValueError``."""
    quant = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in quant and p.requires_grad)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and getattr(m, "weight_quant", None) is not None}  # fmt: skip
    for glob in cfg.targets:
        if not fnmatch.filter(linears, glob):
            raise ValueError(f"lora.targets: {glob!r} matches no quantized linear layer; allowed: globs of "
                             f"{', '.join(list(linears)[:4])}, ...")  # fmt: skip
    names = [n for n in linears if any(fnmatch.fnmatchcase(n, g) for g in cfg.targets)]
    for n in names:
        m = linears[n]
        delta = LowRankDelta(m.out_features, m.in_features, cfg.rank, cfg.alpha).to(m.weight.device)
        parametrize.register_parametrization(m, "weight", delta)
    return names


def merge_lora(model: nn.Module) -> int:
    """Write every adapter into its layer's weight (``W + scale · B A``) and remove it; returns how many."""
    merged = 0
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and any(
            isinstance(p, LowRankDelta) for p in m.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            merged += 1
    return merged


__all__ = ["LoRAConfig", "LowRankDelta", "add_lora", "merge_lora"]
