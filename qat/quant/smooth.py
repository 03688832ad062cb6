"""SmoothQuant: move activation outliers into the weights, one factor per input channel.

``x @ W.T == (x / s) @ (W * s).T`` for any positive ``s`` over the input channels. Transformers put a few
input channels of their linears (LayerNorm outputs, FFN activations) 10-100x above the rest, and a static
per-tensor activation scale must cover them, so the other channels get a handful of int8 levels.
``s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)`` flattens the activation channels at the cost of
wider weight columns; ``alpha`` sets the split (Xiao et al. 2023, "SmoothQuant"). Both sides then quantize
as usual: the weight quantizer sees ``W * s``, the activation quantizer ``x / s``, and the integer GEMM is
unchanged. The export stores ``W * s`` as codes and ``s`` with the layer's input; the runtime divides by it.

``s`` is fitted once, from calibration data, before the quantizers calibrate (:func:`qat.calibrate`), and
is then a fixed buffer (saved in checkpoints, broadcast by DDP, not trained).
"""

from __future__ import annotations

import torch
from torch import nn

# Keeps s finite for channels that are (almost) always zero: their weights shrink, nothing else changes.
_FLOOR = 1e-5


class Smoother(nn.Module):
    """The per-input-channel factors ``s`` of one linear layer, and whether they have been fitted."""

    def __init__(self, channels: int, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` over the last dimension (the layer's input features)."""
        return x / self.scale

    def scale_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W * s`` for a ``[out, in]`` weight."""
        return weight * self.scale

    @torch.no_grad()
    def fit(self, act_absmax: torch.Tensor, weight: torch.Tensor) -> None:
        """Set ``s`` from the input's per-channel max |x| (over calibration data) and the float ``[out, in]``
        weight."""
        a = act_absmax.detach().float().clamp_min(_FLOOR)
        w = weight.detach().abs().amax(dim=0).float().clamp_min(_FLOOR)
        s = a.pow(self.alpha) / w.pow(1.0 - self.alpha)
        self.scale.copy_(s.clamp_min(_FLOOR).to(self.scale.device))
        self.calibrated.fill_(True)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, alpha={self.alpha}"
