"""Engine rules: the quantizers of the engines a model is deployed on, as scale sources, bit for bit.

A rule recomputes its scale from the current tensor at every forward pass, like a weight observer that
never lags: no state, no learned parameter, no gradient to the scale (it is a function of the tensor) and
a straight-through gradient for the tensor wherever its code is not clipped. Weights trained on a rule hold
exactly the codes the engine's own quantizer gives for the dequantized weights, so an export never
re-quantizes; activations see the engine's run-time numerics.

* ``scale: gguf``: llama.cpp's reference quantizers (``ggml-quants.c``, ``gguf.quants``) of the block
  format :attr:`QuantSpec.ggml_type` names (:data:`qat.config.GGUF_TYPES`). Each block of values along
  the input dimension stores one scale ``d`` (an fp16 value; Q8_K's is float32) and codes ``q``; the value
  is ``d * q``. Q8_0: ``d = amax / 127``, ``q = roundf(x * (1 / d))``. Q4_0: ``d = max / -8`` with
  ``max`` the signed value of largest magnitude (the first on ties), so ``d < 0`` when it is positive;
  ``q = min(15, trunc(x * (1 / d) + 8.5)) - 8`` in -8..7 (the file stores ``q + 8``). TQ2_0: ``d = amax``,
  ``q = roundf(x * (1 / d))`` in {-1, 0, 1}. Q8_K (activations of ternary weights): ``iscale = -127 / max``,
  ``q = nearest_int(iscale * x)`` (half to even), ``d = 1 / iscale``. An all-zero block has ``d = 0``.
* ``scale: vllm``: vLLM's dynamic int8 kernel (CUDA): ``scale = amax / qmax``, ``q = rint(x * (qmax /
  amax))`` (half to even). Its CPU kernel multiplies by ``1 / scale`` instead: that is ``scale: minmax``.
* ``scale: compressed_tensors``: compressed-tensors' forward, which transformers runs on CPU: ``scale =
  amax / ((qmax - qmin) / 2)`` (amax / 127.5 at 8 bits; float32 eps for 0), ``q = rint(x / scale)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from qat.quant import ste
from qat.quant.observers import finite
from qat.quant.qparams import SCALE_EPS
from qat.quant.sources import QParams, ScaleSource

if TYPE_CHECKING:
    from qat.quant.quantizer import FakeQuantizer

# Per row of a tensor's ``Granularity.rows``: (the scale the engine stores, the multiplier its quantizer
# applies to the values, or None where it divides them by the scale).
Block = tuple[torch.Tensor, torch.Tensor | None]


def divide(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` rounded once, as in C (torch's ``num / t`` is ``(1 / t) * num``, rounded twice)."""
    return torch.full_like(t, num) / t


class EngineRule(ScaleSource):
    """Base: ``block`` gives the stored scale and the multiplier of each row, ``round`` the engine's rounding
    of the scaled values; codes are clamped to the format's grid, values are ``scale * code``."""

    def block(self, fq: FakeQuantizer, rows: torch.Tensor) -> Block:
        raise NotImplementedError

    def round(self, fq: FakeQuantizer, xs: torch.Tensor) -> torch.Tensor:
        return torch.round(xs)

    def _scale(self, fq: FakeQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = fq.granularity
        s, m = self.block(fq, finite(g.rows(x.detach().float())))
        return g.bcast(s, x), None if m is None else g.bcast(m, x)

    def _raw_codes(self, fq: FakeQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored scale, unclipped codes), both broadcast on ``fq.view(x)``."""
        s, m = self._scale(fq, x)
        xv = fq.view(x.detach().float())
        return s, self.round(fq, xv / s if m is None else xv * m)

    def qparams(self, fq, x) -> QParams:
        s = self._scale(fq, x)[0]
        return s, torch.zeros_like(s)

    def forward(self, fq, x):
        s, raw = self._raw_codes(fq, x)
        q = torch.clamp(raw, fq.qmin, fq.qmax)
        y = q * s
        if torch.is_grad_enabled() and x.requires_grad:  # straight through where the code is not clipped
            xv = fq.view(x)
            y = y + (xv - xv.detach()) * (raw == q)
        return y.reshape(x.shape).to(x.dtype)

    def codes(self, fq, x, xv, s, z):
        return torch.clamp(self._raw_codes(fq, x)[1], fq.qmin, fq.qmax)


# ---------------------------------------------------------------------------------------- llama.cpp
def _fp16_scale(d: torch.Tensor) -> Block:
    """llama.cpp's ``y.d = fp16(d); id = d ? 1/d : 0``: the stored fp16 value (as float32) and the float32
    multiplier of the unrounded ``d``."""
    return d.half().float(), torch.where(d == 0, 0.0, torch.reciprocal(d))


def _signed_absmax(rows: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each row; the first one on ties (as llama.cpp's loops)."""
    return rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)


def _q8_k(rows: torch.Tensor) -> Block:
    mx = _signed_absmax(rows)
    iscale = torch.where(mx == 0, 0.0, divide(-127.0, mx))
    return torch.where(mx == 0, 0.0, torch.reciprocal(iscale)), iscale


def _q4_0_codes(xs: torch.Tensor) -> torch.Tensor:
    return torch.trunc(xs + 8.5) - 8  # ``(int8)(x*id + 8.5f)``: the scaled values are > -8.5, trunc = floor


class BlockRule(NamedTuple):
    """One llama.cpp block format's reference quantizer: ``block(rows)`` and ``round(scaled values)``."""

    block: Callable[[torch.Tensor], Block]
    round: Callable[[torch.Tensor], torch.Tensor]


# GGML type -> its reference quantizer (the formats and block sizes are qat.config.GGUF_TYPES).
GGUF_RULES: dict[str, BlockRule] = {
    "Q8_0": BlockRule(lambda rows: _fp16_scale(rows.abs().amax(dim=1) / 127), ste.round_half_away),
    "Q4_0": BlockRule(lambda rows: _fp16_scale(_signed_absmax(rows) / -8), _q4_0_codes),
    "TQ2_0": BlockRule(lambda rows: _fp16_scale(rows.abs().amax(dim=1)), ste.round_half_away),
    "Q8_K": BlockRule(_q8_k, torch.round),
}


class GGUF(EngineRule):
    """``scale: gguf``: the reference quantizer of ``fq.spec.ggml_type``, on blocks of the input dimension.
    Fixed width: bit-width annealing does not apply (the quantizer's ``target_bits`` is None)."""

    def block(self, fq, rows):
        return GGUF_RULES[fq.spec.ggml_type].block(rows)

    def round(self, fq, xs):
        return GGUF_RULES[fq.spec.ggml_type].round(xs)


def gguf_blocks(fq: FakeQuantizer, w: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """What a GGUF writer stores for the weight ``w [out, in]`` of a ``scale: gguf`` quantizer: the GGML
    type name, the codes ``[out, in]`` (int8: Q8_0 -127..127, Q4_0 -8..7, TQ2_0 -1..1) and the scales
    ``[out, in / block]`` (float16, exact; Q4_0's may be negative). ``d * q`` is the fake-quant weight."""
    codes, scale, _ = fq.quantize(w)
    rows = int(w.shape[0])
    return str(fq.spec.ggml_type), codes.reshape(rows, -1), scale.reshape(rows, -1).half()


# ---------------------------------------------------------------------------------------- vLLM, transformers
class VLLM(EngineRule):
    """``scale: vllm``: vLLM's ``dynamic_scaled_int8_quant`` (CUDA): scale amax / qmax, multiplier
    qmax / amax (one division), round half to even; an all-zero row has codes 0 (its scale: float32 eps)."""

    def block(self, fq, rows):
        amax = rows.abs().amax(dim=1)
        inverse = torch.where(amax == 0, 0.0, divide(fq.qmax, amax))
        return torch.where(amax == 0, SCALE_EPS, amax / fq.qmax), inverse


class CompressedTensors(EngineRule):
    """``scale: compressed_tensors``: compressed-tensors' ``calculate_qparams`` + ``fake_quantize`` for
    dynamic symmetric activations: scale amax / ((qmax - qmin) / 2) (0 -> float32 eps), codes
    round(clamp(x / scale)) (clamping first or last gives the same codes on an integer grid).
    Note: its ``strategy: token`` reduces every dimension but the first two, so a 2-D input gets one
    scale per tensor there; linear inputs of transformers models are 3-D."""

    def block(self, fq, rows):
        s = rows.abs().amax(dim=1) / ((fq.qmax - fq.qmin) / 2)
        return torch.where(s == 0, SCALE_EPS, s), None
