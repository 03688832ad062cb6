"""Conv-BatchNorm folding for QAT: BN is folded into the conv weight *before* fake quantization, so the grid
the network trains against is the grid of the deployed conv, which has no BatchNorm.

Formulation: Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference",
section 3.2, in the form of ``torch.ao.nn.intrinsic.qat.ConvBn2d`` (running-statistics correction):

* the quantizer always sees ``w_fold = w * gamma / sqrt(running_var + eps)``, folded with the *running*
  statistics, so the weight grid does not jitter with each batch;
* while BN is in training mode (before the schedule's ``freeze_bn_step``) the running-std factor is divided
  out of the conv output again and BN normalises with the batch statistics (and keeps updating the running
  ones): ``y = BN(conv(x, fq(w_fold)) / f + b)``;
* once BN is frozen (eval mode: ``QATSchedule.freeze_bn_step``, validation, export) the layer computes
  exactly the folded conv ``y = conv(x, fq(w_fold)) + beta + (b - running_mean) * f``.

``deployable()`` is the :class:`QuantConv2d` the layer computes in eval mode (same quantizers, folded weight
and bias), which is what export encodes (:func:`qat.quant.modules.deployed`); ``to_float()`` gives the
folded float ``nn.Conv2d``. Which conv is paired with which BN is decided from the forward pass, in
:mod:`qat.quant.bnpairs`; ``prepare`` applies the fold as a pattern pass (``qat.rewrite.PATTERN_PASSES``).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.config import QuantSpec
from qat.quant.modules import QuantConv, QuantConv2d, _conv_kwargs, conv_int_ok, eval_int_conv, int_gemm_eval


class QuantConvBn2d(QuantConv, nn.Conv2d):
    """``nn.Conv2d`` followed by its ``nn.BatchNorm2d`` (kept as the child ``bn``), fake-quantized folded.

    The conv's own parameters stay the trainable ones (``weight``, optional ``bias``); ``bn`` keeps its
    affine parameters and running statistics, so a checkpoint restores everything.
    """

    float_type = nn.Conv2d
    bn: nn.BatchNorm2d
    bn_name: str

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        name: str = "",
        bn_name: str = "",
    ) -> QuantConvBn2d:
        """``bn_name``: where ``bn`` sat in the model (it becomes an ``nn.Identity`` there); the export
        records it, so that the runtime knows which BatchNorm of the user's model class was folded."""
        if not bn.track_running_stats or bn.num_features != conv.out_channels:
            raise ValueError(
                f"quant.fold_bn: layer '{name}' cannot be folded with its BatchNorm (needs running "
                f"statistics and num_features == out_channels = {conv.out_channels})"
            )
        q = super().from_float(conv, weight_spec, act_spec, name)
        q.bn = bn
        q.bn_name = bn_name
        return q

    def _factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        return bn.weight / std if bn.affine else torch.reciprocal(std)

    def _folded_bias(self, factor: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        shift = (bias - self.bn.running_mean) * factor
        return shift + self.bn.bias if self.bn.affine else shift

    def folded_weight(self) -> torch.Tensor:
        """The float weight the quantizer sees (BN folded in with the running statistics)."""
        return self.weight * self._factor().reshape(-1, 1, 1, 1)

    def quantized_weight(self) -> torch.Tensor:
        w = self.folded_weight()
        return w if self.weight_quant is None else self.weight_quant(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self._factor()
        if not self.bn.training and int_gemm_eval(self, self.weight) and conv_int_ok(self, self.input_quant):
            return eval_int_conv(self, x, self.folded_weight, self._folded_bias(factor))
        if self.input_quant is not None:
            x = self.input_quant(x)
        wq = self.quantized_weight()
        if self.bn.training:  # BN not frozen yet: batch statistics, running-std factor divided out again
            y = self._conv_forward(x, wq, None) / factor.reshape(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
            return self.bn(y)
        return self._conv_forward(x, wq, self._folded_bias(factor))

    @torch.no_grad()
    def to_float(self) -> nn.Conv2d:
        """A plain conv with the BN folded in (running statistics): what the float model deploys as."""
        m = nn.Conv2d(**{**_conv_kwargs(self), "bias": True})
        m.weight = nn.Parameter(self.folded_weight().detach().clone())
        m.bias = nn.Parameter(self._folded_bias(self._factor()).detach().clone())
        m.to(self.weight.device)
        m.train(self.training)
        return m

    def deployable(self) -> QuantConv2d:
        """The :class:`QuantConv2d` this layer computes in eval mode (same quantizer modules and state),
        what export encodes. It keeps the folded BN's name as ``folded_bn`` (written into the layer entry,
        so that the loader turns that BatchNorm of the user's model into an identity)."""
        q = QuantConv2d.from_float(self.to_float(), None, None)
        q.weight_quant = self.weight_quant
        q.input_quant = self.input_quant
        q.folded_bn = self.bn_name
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bn folded"
