"""``FakeQuantizer``: one module per quantized tensor, holding every piece of its state in buffers/parameters.

State: ``scale`` / ``zero_point`` (buffers for observer scales, parameters for learned ones), the observer's
running range, and the flags ``fake_quant_enabled`` / ``observer_enabled`` / ``initialized``. All of it is in
the state dict, so checkpoints restore it exactly and DDP broadcasts it. The forward pass reads plain Python
mirrors of the flags (refreshed whenever the buffers are set or loaded), so it never syncs with the device
and ``torch.compile`` sees static control flow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant import ste
from qat.quant.observers import MSEObserver, Observer, finite, make_observer
from qat.quant.qparams import SCALE_EPS, SCALE_MAX, lsq_init_scale, qparams_from_range

# Scale sources whose values are trained by the optimizer (kept out of weight decay).
LEARNED_SCALES = ("lsq", "pact", "ttq")
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def _sync_flags_after_load(module: FakeQuantizer, _incompatible_keys: object) -> None:
    """load_state_dict post hook (a module-level function, not a lambda, so quantized models pickle)."""
    module._sync_flags()


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor as described by a :class:`QuantSpec`.

    ``role``: "weight" (the tensor is a parameter: observers follow the current values) or "activation"
    (observers accumulate over training batches; dynamic specs compute scales from each tensor).
    ``shape``: the weight's shape, or ``(channels,)`` for a per-channel activation quantizer.
    ``name``: the owning layer, used in error messages only.
    ``act_axis``: the channel axis of a per-channel activation (-1 for linear inputs, 1 for conv inputs).
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
        self.target_bits: int | None = int(spec.bits) if spec.kind == "int" else None
        self._bits = self.target_bits
        self.stat_shape = self._stat_shape(shape)
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.observer: Observer | None = None
        self.scale: torch.Tensor | None = None
        self.zero_point: torch.Tensor | None = None
        self.scale_neg: torch.Tensor | None = None
        if spec.dynamic:
            pass
        elif spec.scale in LEARNED_SCALES or (spec.kind == "binary" and spec.scale == "lsq"):
            self.scale = nn.Parameter(torch.ones(self.stat_shape))
            if spec.kind == "int" and not spec.symmetric:  # LSQ+: learned (integer-rounded) offset
                self.zero_point = nn.Parameter(torch.zeros(self.stat_shape))
            if spec.scale == "ttq":  # TTQ: separate learned negative scale
                self.scale_neg = nn.Parameter(torch.ones(self.stat_shape))
        elif spec.kind in ("int", "fp8") and not (spec.kind == "fp8" and spec.scale == "lsq"):
            self.observer = make_observer(
                spec.scale,
                self.stat_shape,
                accumulate=role == "activation",
                qmin=self.qmin,
                qmax=self.qmax,
                symmetric=spec.symmetric,
                ema_decay=spec.ema_decay,
                percentile=spec.percentile,
            )
            del self.scale, self.zero_point  # plain ``None`` attributes above; buffers must not pre-exist
            self.register_buffer("scale", torch.ones(self.stat_shape))
            self.register_buffer("zero_point", torch.zeros(self.stat_shape))
        self._fq_on = True
        self._obs_on = True
        self._initialized = False
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

    def _sync_flags(self) -> None:
        """Refresh the Python mirrors from the buffers (after load_state_dict or a DDP broadcast)."""
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
        self._rescale(old_qmin, old_qmax)
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

    @torch.no_grad()
    def _rescale(self, old_qmin: int, old_qmax: int) -> None:
        if self.observer is not None:
            if bool(self.observer.initialized):  # once per width change, not per forward
                s, z = qparams_from_range(
                    self.observer.min_val, self.observer.max_val, self.qmin, self.qmax, self.spec.symmetric
                )
                self.scale.copy_(s)
                self.zero_point.copy_(z)
            return
        if not self.learned or not self._initialized:
            return  # dynamic, or a learned scale that will be initialised at the new width
        if isinstance(self.zero_point, nn.Parameter):  # LSQ+: keep the real range [lo, hi]
            lo = (old_qmin - torch.round(self.zero_point)) * self.scale.abs()
            self.scale.mul_((old_qmax - old_qmin) / (self.qmax - self.qmin))
            zp = torch.round(self.qmin - lo / torch.clamp(self.scale.abs(), min=SCALE_EPS))
            self.zero_point.copy_(torch.clamp(zp, self.qmin, self.qmax))
        elif self.spec.scale == "pact":  # keep the clipping level alpha = qmax * step
            self.scale.mul_(old_qmax / self.qmax)
        else:  # LSQ: the step follows LSQ's own init rule, proportional to 1 / sqrt(Qp)
            self.scale.mul_(math.sqrt(old_qmax / self.qmax))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[override]
        # ``num_bits`` exists only once a width was changed: match the checkpoint before loading it.
        key = prefix + "num_bits"
        if key in state_dict and "num_bits" not in self._buffers:
            self.register_buffer("num_bits", torch.zeros((), dtype=torch.int16))
        elif key not in state_dict and "num_bits" in self._buffers:
            del self._buffers["num_bits"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @property
    def learned(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    # ---------------------------------------------------------------- shapes
    def _stat_shape(self, shape: Sequence[int] | None) -> tuple[int, ...]:
        g = self.spec.granularity
        if g in ("per_tensor", "per_token") or self.spec.dynamic:
            return (1,)
        if shape is None:
            raise ValueError(f"{self.layer_name}: a {g} quantizer needs the tensor shape")
        shape = tuple(int(s) for s in shape)
        if g == "per_channel":
            axis = self.spec.axis if self.role == "weight" else 0
            if not -len(shape) <= axis < len(shape):
                raise QuantConfigError(
                    f"quant.{self.role}.axis: {self.spec.axis} is out of range for layer '{self.layer_name}' "
                    f"with {self.role} shape {shape}; allowed: {-len(shape)}..{len(shape) - 1}"
                )
            return (shape[axis],)
        # per_group: groups of group_size consecutive values along the flattened input dimension.
        k = math.prod(shape[1:])
        gs = int(self.spec.group_size or 0)
        if k % gs:
            divisors = [d for d in range(1, k + 1) if k % d == 0]
            raise QuantConfigError(
                f"quant.{self.role}.group_size: {gs} does not divide the input dimension {k} of layer "
                f"'{self.layer_name}' (shape {shape}); allowed: a divisor of {k}, e.g. {divisors[-4:]}"
            )
        return (shape[0], k // gs, 1)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """2-D view with one row per scale: the statistics of row i give scale i."""
        g = self.spec.granularity
        if g == "per_tensor":
            return x.reshape(1, -1)
        if g == "per_channel":
            axis = self._axis()
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)
        if g == "per_group":
            return x.reshape(-1, int(self.spec.group_size))  # type: ignore[arg-type]
        return x.reshape(-1, x.shape[-1])  # per_token

    def _axis(self) -> int:
        return self.spec.axis if self.role == "weight" else self.act_axis

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor reshaped so that scales of ``_param_shape`` broadcast against it."""
        if self.spec.granularity == "per_group":
            gs = int(self.spec.group_size)  # type: ignore[arg-type]
            if self.role == "weight":
                return x.reshape(x.shape[0], -1, gs)
            if x.shape[-1] % gs:
                raise QuantConfigError(
                    f"quant.{self.role}.group_size: {gs} does not divide the last dimension {x.shape[-1]} of "
                    f"the input of layer '{self.layer_name}' (shape {tuple(x.shape)}); allowed: a divisor of "
                    f"{x.shape[-1]}"
                )
            return x.reshape(*x.shape[:-1], -1, gs)
        return x

    def _bcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a per-row tensor (scale, zero point) to broadcast against ``_view(x)``."""
        g = self.spec.granularity
        if g == "per_tensor":
            return p.reshape(1)
        if g == "per_channel":
            axis = self._axis() % x.dim()
            return p.reshape([-1 if d == axis else 1 for d in range(x.dim())])
        if g == "per_group":
            lead = x.shape[:1] if self.role == "weight" else x.shape[:-1]
            return p.reshape(*lead, -1, 1)
        return p.reshape(*x.shape[:-1], 1)  # per_token

    # ---------------------------------------------------------------- scale sources
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x.detach())
        assert self.observer is not None
        self.observer.update(rows)
        if self.spec.kind == "fp8":
            bound = torch.maximum(-self.observer.min_val, self.observer.max_val)
            self.scale.copy_(torch.clamp(bound / FP8_MAX[self.spec.format], min=SCALE_EPS, max=SCALE_MAX))
            return
        s, z = qparams_from_range(
            self.observer.min_val, self.observer.max_val, self.qmin, self.qmax, self.spec.symmetric
        )
        self.scale.copy_(s)
        self.zero_point.copy_(z)

    @torch.no_grad()
    def _init_learned(self, x: torch.Tensor) -> None:
        """One-time data-dependent init of learned scales (LSQ/LSQ+/PACT/TTQ), averaged across DDP ranks."""
        rows = finite(self._rows(x.detach().float()))
        spec = self.spec
        if spec.scale == "pact":  # the parameter is the step: clipping level alpha = max(x) = qmax * scale
            init = rows.amax(dim=1) / self.qmax
        elif spec.kind == "binary":
            init = rows.abs().mean(dim=1)
        elif spec.scale == "ttq":
            init = rows.abs().mean(dim=1)
        elif spec.kind == "fp8":
            init = rows.abs().amax(dim=1) / FP8_MAX[spec.format]
        elif not spec.symmetric or spec.init != "lsq":
            lo, hi = self._init_range(rows)
            init, zp = qparams_from_range(lo, hi, self.qmin, self.qmax, spec.symmetric)
            if not spec.symmetric:
                self._all_ranks_mean(zp)
                self.zero_point.copy_(torch.round(zp).reshape(self.stat_shape))
        else:
            init = lsq_init_scale(rows, self.qmax)
        init = torch.clamp(init, min=SCALE_EPS, max=SCALE_MAX)  # max: a mean |x| of huge values overflows
        self._all_ranks_mean(init)
        self.scale.copy_(init.reshape(self.stat_shape))
        if self.scale_neg is not None:
            self.scale_neg.copy_(self.scale)
        self.initialized.fill_(1)
        self._initialized = True

    def _init_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row range a learned int scale starts from: the data's min/max, or (``init="mse"``) the
        clipped range with the least quantization error."""
        if self.spec.init == "mse":
            search = MSEObserver(self.stat_shape, self.qmin, self.qmax, self.spec.symmetric)
            return search.batch_range(rows)
        return rows.amin(dim=1), rows.amax(dim=1)

    @staticmethod
    def _all_ranks_mean(t: torch.Tensor) -> None:
        # Each rank sees different data; averaging keeps learned scales identical across DDP ranks.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())

    def _lsq_grad_scale(self, x: torch.Tensor, p: torch.Tensor) -> float:
        """LSQ's gradient scale 1/sqrt(N * Qp) for a learned parameter ``p`` of this quantizer."""
        n = x.numel() / p.numel()
        if self.role == "activation" and x.dim() > 1:
            n = n / x.shape[0]  # LSQ counts features per example for activations
        return 1.0 / math.sqrt(max(n, 1.0) * max(self.qmax, 1))

    def _learned_scale(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Positive learned scale with LSQ gradient scaling."""
        return torch.clamp(ste.grad_scale(p, self._lsq_grad_scale(x, p)).abs(), min=SCALE_EPS)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) exactly as the forward pass uses them, shaped to broadcast on ``_view(x)``."""
        spec = self.spec
        if spec.dynamic:
            rows = finite(self._rows(x.detach()))
            if spec.kind == "fp8":
                s = torch.clamp(rows.abs().amax(dim=1) / FP8_MAX[spec.format], min=SCALE_EPS, max=SCALE_MAX)
                return self._bcast(s, x), self._bcast(torch.zeros_like(s), x)
            s, z = qparams_from_range(
                rows.amin(dim=1), rows.amax(dim=1), self.qmin, self.qmax, spec.symmetric
            )
            return self._bcast(s, x), self._bcast(z, x)
        if self.learned:
            s = self._learned_scale(x, self.scale)
            if isinstance(self.zero_point, nn.Parameter):  # LSQ+ scales the offset's gradient the same way
                zp = ste.grad_scale(self.zero_point, self._lsq_grad_scale(x, self.zero_point))
                z = torch.clamp(ste.round_ste(zp), self.qmin, self.qmax)
            else:
                z = torch.zeros_like(s)
            return self._bcast(s, x), self._bcast(z, x)
        if spec.kind in ("binary", "ternary"):
            return self._rule_scale(x)
        return self._bcast(self.scale, x), self._bcast(self.zero_point, x)

    def _rule_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form binary/ternary scales: (alpha, threshold) per row, computed from the current tensor."""
        rows = finite(self._rows(x.detach()))
        mean_abs = rows.abs().mean(dim=1)
        if self.spec.kind == "binary":  # XNOR-Net: alpha = mean |w|
            alpha = mean_abs
            thr = torch.zeros_like(alpha)
        elif self.spec.scale == "twn":  # TWN: delta = 0.7 mean|w|, alpha = mean |w| over |w| > delta
            thr = 0.7 * mean_abs
            mask = rows.abs() > thr[:, None]
            alpha = (rows.abs() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:  # BitNet b1.58 absmean: gamma = mean |w|, w_t = round(clamp(w / gamma, -1, 1))
            alpha = mean_abs
            thr = 0.5 * mean_abs
        alpha = torch.clamp(alpha, min=SCALE_EPS)
        return self._bcast(alpha, x), self._bcast(thr, x)

    # ---------------------------------------------------------------- forward
    def update_state(self, x: torch.Tensor) -> None:
        """What a forward pass does to the state before quantizing ``x``: observe it (weights always, while
        enabled; activations in training mode) and initialise learned scales on first use."""
        if self.observer is not None and self._obs_on and (self.role == "weight" or self.training):
            self._observe(x)
        if self._fq_on and self.learned and not self._initialized:
            self._init_learned(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        self.update_state(x)
        if not self._fq_on:
            return x
        xv = self._view(x)
        if spec.kind == "binary" and self.role == "activation" and not self.learned:
            return ste.sign_ste(x)  # binary activations: sign with hardtanh STE, no scale
        s, z = self.qparams(x)
        if spec.scale == "pact":
            y = self._pact(xv, s)
        elif spec.kind == "int":
            y = ste.fake_quant_affine(xv, s, z, self.qmin, self.qmax)
        elif spec.kind == "fp8":
            y = ste.fake_quant_fp8(xv, s, spec.format)
        elif spec.kind == "binary":
            y = ste.sign_ste(xv) * s
        elif spec.scale == "ttq":
            y = self._ttq(x, xv, s)
        else:
            # TWN / BitNet: alpha * {-1, 0, +1} (z carries the threshold); plain straight-through gradient
            # dL/dw = dL/dw_q as in both papers (the value is exactly t * alpha: adding 0 is exact).
            t = ste.ternary_ste(xv.detach(), z)
            y = t * s + (xv - xv.detach())
        return y.reshape(x.shape)

    def _pact(self, xv: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """PACT (Choi et al., 2018): y = quant(clip(x, 0, alpha)), alpha = qmax * step.

        Gradients as in the paper: dy/dx = 1 on [0, alpha), dy/dalpha = 1 where x >= alpha and 0 elsewhere
        (the rounding is straight-through). The value is the affine fake quant's, bit for bit.
        """
        zero = torch.zeros_like(s)
        value = ste.fake_quant_affine(xv.detach(), s.detach(), zero, self.qmin, self.qmax)
        clipped = torch.minimum(torch.clamp(xv, min=0.0), s * self.qmax)
        return value + (clipped - clipped.detach())

    def _ttq(self, x: torch.Tensor, xv: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """TTQ (Zhu et al., 2017): +Wp above t*max|w|, -Wn below -t*max|w| (t = 0.05), 0 between.

        Wp / Wn get the summed gradients of their positions; the latent weight gets the gradient scaled by
        Wp, 1 or Wn in the three regions (the paper's eq. 8).
        """
        thr = self._bcast(0.05 * finite(self._rows(x.detach())).abs().amax(dim=1), x)
        neg = self._bcast(self._learned_scale(x, self.scale_neg), x)
        xd = xv.detach()
        pos_mask, neg_mask = xd > thr, xd < -thr
        value = torch.where(pos_mask, s, torch.where(neg_mask, -neg, torch.zeros_like(xd)))
        g = torch.where(pos_mask, s.detach(), torch.where(neg_mask, neg.detach(), torch.ones_like(xd)))
        return value + (xv - xd) * g

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes as an integer-valued float tensor shaped like ``_view(x)`` (uint codes unwrapped),
        scale and zero point, from the current state (no state update, no gradient).

        Binary codes are {-1, +1}, ternary {-1, 0, +1} (their "zero point" is the rule's threshold, not an
        offset); FP8 "codes" are the scaled values rounded to float8.
        """
        with torch.no_grad():
            xv = self._view(x.float())
            s, z = self.qparams(x)
            if self.spec.kind == "int":
                q = ste.quantize_affine(xv, s, z, self.qmin, self.qmax)
            elif self.spec.kind == "fp8":
                q = ste.round_to_fp8(xv / s, self.spec.format)
            elif self.spec.kind == "binary":
                q = torch.where(xv >= 0, 1.0, -1.0)
            elif self.spec.scale == "ttq":
                thr = self._bcast(0.05 * finite(self._rows(x)).abs().amax(dim=1), x)
                q = (xv > thr).float() - (xv < -thr).float()
            else:
                q = (xv > z).float() - (xv < -z).float()
            return q, s, z

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What export stores: :meth:`codes` as int8 (uint codes wrap; FP8 values stay float)."""
        q, s, z = self.codes(x)
        return (q if self.spec.kind == "fp8" else q.to(torch.int8)), s, z

    def extra_repr(self) -> str:
        return f"{self.role}: {self.spec.describe()}, stat_shape={self.stat_shape}"
