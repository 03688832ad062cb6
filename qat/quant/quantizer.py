"""``FakeQuantizer``: one module per quantized tensor, holding every piece of its state in buffers/parameters.

State: what its scale source (:mod:`qat.quant.sources`) registers (``scale`` / ``zero_point`` /
``scale_neg``, ``observer.*``) and the flags ``fake_quant_enabled`` / ``observer_enabled`` /
``initialized``. All of it is in the state dict, so checkpoints restore it exactly and DDP broadcasts it.
The forward pass reads plain Python mirrors of the flags (refreshed whenever the buffers are set or
loaded), so it never syncs with the device and ``torch.compile`` sees static control flow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant import engines, sources
from qat.quant.granularity import Granularity
from qat.quant.layer_function import Operand
from qat.quant.sources import Effective, ScaleSource, learned_scale

# The registry of scale sources: (format kind, spec.scale), with "dynamic" as the scale of dynamic specs
# whose scale is the tensor's range (engines' dynamic rules keep their own name).
SOURCES: dict[tuple[str, str], type[ScaleSource]] = {
    **{("int", s): sources.Observed for s in ("minmax", "ema", "percentile", "mse")},
    **{("fp8", s): sources.FP8Observed for s in ("minmax", "ema")},
    ("int", "lsq"): sources.LSQ, ("int", "pact"): sources.PACT, ("int", "dynamic"): sources.Dynamic,
    ("fp8", "lsq"): sources.FP8LSQ, ("fp8", "dynamic"): sources.FP8Dynamic,
    ("binary", "mean"): sources.BinaryMean, ("binary", "lsq"): sources.BinaryLSQ,
    ("ternary", "twn"): sources.TWN, ("ternary", "absmean"): sources.AbsMean, ("ternary", "ttq"): sources.TTQ,
    ("int", "gguf"): engines.GGUF, ("ternary", "gguf"): engines.GGUF,
    ("int", "vllm"): engines.VLLM, ("int", "compressed_tensors"): engines.CompressedTensors,
}  # fmt: skip


# ``torch.compile(..., options=COMPILE_OPTIONS)``: inductor options under which every quantizer computes
# its eager values, so that generated kernels keep the rounding of a cast to a narrower float (the fp16
# scales of llama.cpp's formats, :mod:`qat.quant.engines`; inductor drops it by default).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


def source_key(spec: QuantSpec) -> tuple[str, str]:
    """The :data:`SOURCES` key of a spec."""
    return spec.kind, "dynamic" if spec.dynamic and spec.scale == "minmax" else str(spec.scale)


def _sync_flags_after_load(module: FakeQuantizer, _incompatible_keys: object) -> None:
    """load_state_dict post hook (a module-level function, not a lambda, so quantized models pickle)."""
    module.sync_flags()


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor as described by a :class:`QuantSpec`.

    ``role``: "weight" (the tensor is a parameter: observers follow the current values) or "activation"
    (observers accumulate over training batches; dynamic specs compute scales from each tensor).
    ``shape``: the weight's shape, or ``(channels,)`` for a per-channel activation quantizer.
    ``name``: the owning layer, used in error messages only.
    ``act_axis``: the channel axis of a per-channel activation (-1 for linear inputs, 1 for conv inputs).
    Other modules read the attributes without a leading underscore (``stat_shape`` is the scale's compact
    shape, ``granularity`` its :class:`~qat.quant.granularity.Granularity`) and never write them.
    """

    def __init__(
        self,
        spec: QuantSpec,
        role: str,
        shape: Sequence[int] | None = None,
        name: str = "",
        act_axis: int = -1,
    ) -> None:
        super().__init__()
        self.act_axis = act_axis
        if role not in ("weight", "activation"):
            raise ValueError(f"role: {role!r} is not valid; allowed: weight, activation")
        self.spec = spec
        self.role = role
        self.layer_name = name
        self.qmin, self.qmax = spec.qmin_qmax
        # Bit-width annealing (int formats): the config's width is the target; ``set_bits`` changes the
        # current width, kept in the ``num_bits`` buffer (registered on first change), mirrored in ``_bits``.
        # (llama.cpp's block formats have a fixed width: no annealing.)
        self.target_bits: int | None = int(spec.bits) if spec.kind == "int" and not spec.ggml_type else None
        self._bits = self.target_bits
        axis, weight = (spec.axis, True) if role == "weight" else (act_axis, False)
        self.granularity = Granularity(spec.granularity, axis, int(spec.group_size or 0), weight)
        self.stat_shape = self._stat_shape(shape)
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.source = SOURCES[source_key(spec)]()
        self.source.setup(self)  # registers what the source keeps: scale, zero_point, scale_neg, observer
        for attr in ("observer", "scale", "zero_point", "scale_neg"):  # None where the source keeps none
            if not hasattr(self, attr):
                setattr(self, attr, None)
        self._fq_on, self._obs_on, self._initialized = True, True, False  # mirrors of the flag buffers
        self.register_load_state_dict_post_hook(_sync_flags_after_load)

    # ---------------------------------------------------------------- flags
    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantizer:
        self.fake_quant_enabled.fill_(int(enabled))
        self._fq_on = bool(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> FakeQuantizer:
        self.observer_enabled.fill_(int(enabled))
        self._obs_on = bool(enabled)
        return self

    @property
    def fake_quant_on(self) -> bool:  # else the forward pass returns its input
        return self._fq_on

    @property
    def observer_on(self) -> bool:
        return self._obs_on

    @property
    def is_initialized(self) -> bool:  # a learned scale got its first value (False for other sources)
        return self._initialized

    def sync_flags(self) -> None:
        """Refresh the Python mirrors from the buffers (after load_state_dict, a broadcast, a direct set)."""
        self._fq_on = bool(self.fake_quant_enabled)
        self._obs_on = bool(self.observer_enabled)
        self._initialized = bool(self.initialized)
        num_bits = self._buffers.get("num_bits")
        self._use_bits(self.target_bits if num_bits is None else int(num_bits))

    # ---------------------------------------------------------------- bit width (annealing)
    @property
    def bits(self) -> int | None:
        """Current bit width of an int format (None for binary / ternary / fp8)."""
        return self._bits

    @torch.no_grad()
    def set_bits(self, bits: int) -> FakeQuantizer:
        """Change the bit width of an int quantizer during training (bit-width annealing).

        The state is carried over as the quantizer would have initialised it at the new width, so a step
        8 -> 4 -> 2 does not start from a useless grid: observer scales are recomputed from the observed
        range; LSQ steps (initialised as ``2 mean|x| / sqrt(Qp)``) are multiplied by
        ``sqrt(Qp_old / Qp_new)``; range-initialised learned scales (PACT, LSQ+) keep their clipping range.
        """
        if self.target_bits is None:
            raise QuantConfigError(
                f"schedule.bits: layer '{self.layer_name}' has format {self.spec.format}; "
                "allowed: only int formats (int2..int8, uint2..uint8) change width"
            )
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise QuantConfigError(f"schedule.bits: {bits!r} is not valid; allowed: an integer 2..8")
        if bits == self._bits:
            return self
        old_qmin, old_qmax = self.qmin, self.qmax
        self._use_bits(bits)
        if self._initialized or not self.learned:  # a learned scale not yet set starts at the new width
            self.source.rescale(self, old_qmin, old_qmax)
        if "num_bits" not in self._buffers:
            device = self.fake_quant_enabled.device
            self.register_buffer("num_bits", torch.zeros((), dtype=torch.int16, device=device))
        self.num_bits.fill_(bits)
        return self

    def _use_bits(self, bits: int | None) -> None:
        """Point the spec, qmin and qmax at ``bits`` (no state change: used on load and by set_bits)."""
        if bits is None or bits == self._bits:
            return
        prefix = "int" if self.spec.signed else "uint"
        self.spec = dataclasses.replace(self.spec, format=f"{prefix}{bits}")
        self.qmin, self.qmax = self.spec.qmin_qmax
        self._bits = bits

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[override]
        # ``num_bits`` exists only once a width was changed: match the checkpoint before loading it.
        key = prefix + "num_bits"
        if key in state_dict and "num_bits" not in self._buffers:
            self.register_buffer("num_bits", torch.zeros((), dtype=torch.int16))
        elif key not in state_dict and "num_bits" in self._buffers:
            del self._buffers["num_bits"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @property
    def learned(self) -> bool:  # the scale is a trained parameter
        return isinstance(self.scale, nn.Parameter)

    # ---------------------------------------------------------------- shapes
    def _stat_shape(self, shape: Sequence[int] | None) -> tuple[int, ...]:
        g = self.spec.granularity
        if g in ("per_tensor", "per_token") or self.spec.dynamic:
            return (1,)
        if shape is None:
            raise ValueError(f"{self.layer_name}: a {g} quantizer needs the tensor shape")
        shape = tuple(int(s) for s in shape)
        gran = self.granularity
        if g == "per_channel":
            if self.role == "activation":  # the layer passes (channels,): the compact shape itself
                gran = dataclasses.replace(gran, axis=0)
            if not -len(shape) <= gran.axis < len(shape):
                raise QuantConfigError(
                    f"quant.{self.role}.axis: {self.spec.axis} is out of range for layer '{self.layer_name}' "
                    f"with {self.role} shape {shape}; allowed: {-len(shape)}..{len(shape) - 1}"
                )
        else:  # per_group: groups of group_size consecutive values along the flattened input dimension
            k, gs = math.prod(shape[1:]), self.granularity.group_size
            if k % gs:
                divisors = [d for d in range(1, k + 1) if k % d == 0]
                raise QuantConfigError(
                    f"quant.{self.role}.group_size: {gs} does not divide the input dimension {k} of layer "
                    f"'{self.layer_name}' (shape {shape}); allowed: a divisor of {k}, e.g. {divisors[-4:]}"
                )
        return gran.stat_shape(shape)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped so that the scales of :meth:`qparams` broadcast against it (per_group adds a
        group axis; other granularities return ``x``)."""
        gs = self.granularity.group_size
        if self.spec.granularity == "per_group" and self.role == "activation" and x.shape[-1] % gs:
            raise QuantConfigError(
                f"quant.{self.role}.group_size: {gs} does not divide the last dimension {x.shape[-1]} of "
                f"the input of layer '{self.layer_name}' (shape {tuple(x.shape)}); allowed: a divisor of "
                f"{x.shape[-1]}"
            )
        return self.granularity.view(x)

    # ---------------------------------------------------------------- scale source
    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) exactly as the forward pass uses them, shaped to broadcast on :meth:`view`."""
        return self.source.qparams(self, x)

    def learned_scale(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A learned ``p`` (``scale``, ``scale_neg``) as the forward pass on ``x`` uses it (shaped like p)."""
        return learned_scale(self, x, p)

    def effective_qparams(self) -> Effective:
        """Stored (scale, zero_point, scale_neg) as the forward uses them, compact, detached; None where
        the source keeps none (dynamic and closed-form scales are computed from each tensor)."""
        return self.source.effective(self)

    def update_state(self, x: torch.Tensor) -> None:
        """What a forward pass does to the state before quantizing ``x``: observe it (weights always, while
        enabled; activations in training mode) and initialise learned scales on first use."""
        if self.observer is not None and self._obs_on and (self.role == "weight" or self.training):
            self.source.observe(self, x)
        if self._fq_on and self.learned and not self._initialized:
            self.source.init(self, x)
            self.initialized.fill_(1)
            self._initialized = True

    def forward(self, x: torch.Tensor, operand: bool = False) -> torch.Tensor | Operand:
        """The fake-quantized ``x``; with ``operand``, an :class:`~qat.quant.layer_function.Operand` that
        leaves the fake quant to a quantized layer's Function where the source allows it (called through
        the module, so that hooks see it as a forward pass)."""
        self.update_state(x)
        if not self._fq_on:
            return Operand(x) if operand else x
        return self.source.operand(self, x) if operand else self.source.forward(self, x)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes as an integer-valued float tensor shaped like :meth:`view` (uint codes unwrapped),
        scale and zero point, from the current state (no state update, no gradient).

        Binary codes are {-1, +1}, ternary {-1, 0, +1} (their "zero point" is the rule's threshold, not an
        offset); FP8 "codes" are the scaled values rounded to float8.
        """
        with torch.no_grad():
            xv = self.view(x.float())
            s, z = self.qparams(x)
            return self.source.codes(self, x, xv, s, z), s, z

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What export stores: :meth:`codes` as int8 (uint codes wrap; FP8 values stay float)."""
        q, s, z = self.codes(x)
        return (q if self.spec.kind == "fp8" else q.to(torch.int8)), s, z

    def extra_repr(self) -> str:
        return f"{self.role}: {self.spec.describe()}, stat_shape={self.stat_shape}"
