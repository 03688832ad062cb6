"""Granularity: which values of a tensor share one scale, and the shapes that follow from it.

One home for the shape rules that the quantizer (training), the export codec, the integer runtime and the
ONNX builder all need, so they cannot drift apart:

* ``per_tensor``: one scale; ``per_channel``: one per index of ``axis``; ``per_token``: one per row of the
  last dimension (dynamic activations); ``per_group``: one per ``group_size`` consecutive values along the
  input dimension: the flattened ``[out, K]`` matrix of a weight, the last dimension of an activation.
* **rows**: a 2-D view with one row per scale (observers and closed-form scales reduce over ``dim=1``);
* **view**: the tensor reshaped so that the scales broadcast against it (per_group adds a group axis);
* **compact** (``stat_shape``): how a weight's scale tensor is stored; **bcast**: how it is reshaped to
  broadcast on the view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


@dataclass(frozen=True)
class Granularity:
    """``kind`` (one of :data:`GRANULARITIES`), the channel ``axis`` (per_channel), the ``group_size``
    (per_group), and whether the tensor is a weight (groups run along its flattened input dimension) or
    an activation (groups run along its last dimension)."""

    kind: str
    axis: int = 0
    group_size: int = 0
    weight: bool = True

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITIES:
            raise ValueError(f"granularity: {self.kind!r} is not valid; allowed: {', '.join(GRANULARITIES)}")
        if self.kind == "per_group" and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size!r} is not valid; allowed: a positive integer")

    def stat_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Compact shape of the scale (and zero point) of a tensor of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if self.kind in ("per_tensor", "per_token"):
            return (1,)
        if self.kind == "per_channel":
            return (shape[self.axis],)
        return (shape[0], math.prod(shape[1:]) // self.group_size, 1)

    def view_shape(self, shape: Sequence[int]) -> list[int]:
        """Shape of :meth:`view` for a tensor of ``shape``."""
        shape = [int(s) for s in shape]
        if self.kind != "per_group":
            return shape
        lead = shape[:1] if self.weight else shape[:-1]
        return [*lead, -1, self.group_size]

    def bcast_shape(self, shape: Sequence[int]) -> list[int]:
        """Shape a scale takes to broadcast on :meth:`view` of a tensor of ``shape`` (symbolic sizes stay
        symbolic: a traced batch dimension stays dynamic)."""
        shape = list(shape)
        if self.kind == "per_tensor":
            return [1]
        if self.kind == "per_channel":
            axis = self.axis % len(shape)
            return [-1 if d == axis else 1 for d in range(len(shape))]
        if self.kind == "per_group":
            lead = shape[:1] if self.weight else shape[:-1]
            return [*lead, -1, 1]
        return [*shape[:-1], 1]  # per_token

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """2-D view with one row per scale: the statistics of row i give scale i."""
        if self.kind == "per_tensor":
            return x.reshape(1, -1)
        if self.kind == "per_channel":
            return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self.kind == "per_group":
            return x.reshape(-1, self.group_size)
        return x.reshape(-1, x.shape[-1])  # per_token

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped so that scales of :meth:`bcast` broadcast against it (``x`` unless per_group)."""
        return x.reshape(self.view_shape(x.shape)) if self.kind == "per_group" else x

    def bcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-row tensor (scale, zero point) reshaped to broadcast against ``view(x)``."""
        return p.reshape(self.bcast_shape(x.shape))
