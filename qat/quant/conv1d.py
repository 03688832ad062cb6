"""GPT-2's ``transformers.pytorch_utils.Conv1D`` as a quantizable layer.

``Conv1D`` is a linear layer whose weight is stored transposed, ``[in, out]``. The quantized layer keeps
that very ``Parameter`` (so checkpoints, tied weights and optimizers see the same tensor) but quantizes
its transpose, the ``[out, in]`` view every other layer has. A per-channel ``axis: 0`` therefore means
"one scale per output feature" and per-group scales group consecutive *input* features, exactly as for
``nn.Linear``; the codes and scales are the ones a ``QuantLinear`` with the transposed weight would get.
Export encodes it as that ``QuantLinear`` (``deployable()``).

This module imports ``transformers``: the layer registry resolves it lazily (``LAZY_QUANT_MODULES`` in
:mod:`qat.quant.modules`), so ``import qat`` does not.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qat.config import QuantSpec
from qat.quant.modules import QuantLinear, _make_quantizers, linear_forward
from qat.quant.opcache import KeepsOperands
from qat.quant.quantizer import FakeQuantizer
from qat.quant.smooth import Smoother


def _empty_conv1d(cls: type[Conv1D], nf: int, nx: int) -> Conv1D:
    """A Conv1D shell without allocating or initialising a weight (the real tensors are moved in)."""
    with torch.device("meta"):
        return cls(nf, nx)


def _move_params(dst: nn.Module, src: nn.Module) -> None:
    dst.weight = src.weight
    dst.bias = src.bias
    dst.train(src.training)


class QuantHFConv1D(KeepsOperands, Conv1D):
    """``Conv1D`` with a fake-quantized weight (quantized as its ``[out, in]`` transpose) and input."""

    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__(nf, nx)
        self.smooth: Smoother | None = None

    def enable_smoothing(self, alpha: float) -> None:
        """Attach SmoothQuant factors over the ``nx`` input features (see :mod:`qat.quant.smooth`)."""
        self.smooth = Smoother(self.nx, alpha).to(self.weight.device)

    @classmethod
    def from_float(
        cls, mod: Conv1D, weight_spec: QuantSpec | None, act_spec: QuantSpec | None, name: str = ""
    ) -> QuantHFConv1D:
        q = _empty_conv1d(cls, mod.nf, mod.nx)
        _move_params(q, mod)
        _make_quantizers(q, mod.weight.t(), weight_spec, act_spec, mod.nx, -1, name)
        return q

    def to_float(self) -> Conv1D:
        m = _empty_conv1d(Conv1D, self.nf, self.nx)
        _move_params(m, self)
        return m

    def float_weight(self) -> torch.Tensor:
        """The float weight in ``[out, in]`` layout (before smoothing)."""
        return self.weight.t()

    def effective_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight the quantizer sees: ``W * s`` with SmoothQuant on, else ``W``."""
        w = self.weight.t()
        return w if self.smooth is None else self.smooth.scale_weight(w)

    def linear_weight(self) -> torch.Tensor:
        """The fake-quantized weight in ``[out, in]`` layout (what ``F.linear`` takes)."""
        w = self.effective_weight()
        return w if self.weight_quant is None else self.weight_quant(w)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight in the stored ``[in, out]`` layout, like ``self.weight`` (smoothed
        weights: ``W * s``, to be applied to ``x / s``)."""
        return self.linear_weight().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)  # on the [out, in] transpose, exactly as QuantLinear

    def deployable(self) -> QuantLinear:
        """The layer as export encodes it: :func:`conv1d_as_linear`."""
        return conv1d_as_linear(self)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def conv1d_as_linear(mod: Conv1D) -> nn.Linear:
    """The ``nn.Linear`` that computes what ``mod`` computes (weight transposed into a new tensor).

    A ``QuantHFConv1D`` becomes a ``QuantLinear`` that keeps the same quantizers: they already work on the
    ``[out, in]`` layout, so the codes and scales are unchanged. Export encodes GPT-2 this way (generic
    ``linear`` entries of the exporter and its integer runtime); a float ``Conv1D`` skeleton is converted
    the same way to load such an export.
    """
    quantized = isinstance(mod, QuantHFConv1D)
    cls = QuantLinear if quantized else nn.Linear
    lin = cls(mod.nx, mod.nf, bias=True, device="meta")
    lin.weight = nn.Parameter(mod.weight.detach().t().contiguous(), requires_grad=mod.weight.requires_grad)
    lin.bias = mod.bias
    if quantized:
        lin.weight_quant = mod.weight_quant
        lin.input_quant = mod.input_quant
        lin.smooth = mod.smooth
    lin.train(mod.training)
    return lin
