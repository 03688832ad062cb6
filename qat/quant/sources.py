"""Scale sources: where a :class:`~qat.quant.quantizer.FakeQuantizer` gets its scale, one small class each.

A source registers its state on the quantizer (so the state-dict keys stay ``scale`` / ``zero_point`` /
``scale_neg`` / ``observer.*``) and owns how that state is observed or initialised, the (scale, zero_point)
the forward pass uses, the fake-quant forward and the codes. Sources hold no tensors: every method takes
the quantizer ``fq``. The quantizer keeps the flags, the bit width and the granularity, and picks its
source from its registry (:data:`qat.quant.quantizer.SOURCES`); the engines' own quantizers are in
:mod:`qat.quant.engines`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from qat.quant import ste
from qat.quant.layer_function import Operand
from qat.quant.observers import MSEObserver, finite, finite_range, make_observer
from qat.quant.qparams import SCALE_EPS, SCALE_MAX, lsq_init_scale, qparams_from_range

if TYPE_CHECKING:
    from qat.quant.quantizer import FakeQuantizer

QParams = tuple[torch.Tensor, torch.Tensor]
Effective = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def from_rank_zero(t: torch.Tensor) -> None:
    """Overwrite ``t`` in place with rank 0's value (DDP, FSDP): every rank starts from the same value, and
    under :func:`qat.calibrate` (rank 0 runs the first batch) from the value one process would have."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)


def lsq_grad_scale(fq: FakeQuantizer, x: torch.Tensor, p: torch.Tensor) -> float:
    """LSQ's gradient scale 1/sqrt(N * Qp) for a learned parameter ``p`` of ``fq`` quantizing ``x``."""
    n = x.numel() / p.numel()
    if fq.role == "activation" and x.dim() > 1:
        n = n / x.shape[0]  # LSQ counts features per example for activations
    return 1.0 / math.sqrt(max(n, 1.0) * max(fq.qmax, 1))


def learned_scale(fq: FakeQuantizer, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A learned scale ``p`` as the forward pass uses it: positive, with LSQ's gradient scale."""
    return torch.clamp(ste.grad_scale(p, lsq_grad_scale(fq, x, p)).abs(), min=SCALE_EPS)


class ScaleSource:
    """Base: no state, the integer (affine) grid. ``setup`` registers state on ``fq``; ``observe`` /
    ``init`` update it before a forward (observers / learned scales); ``rescale`` carries it to a new bit
    width (``fq.qmin/qmax`` are already the new ones); ``qparams`` gives (scale, zero_point) shaped to
    broadcast on ``fq.view(x)``; ``effective`` the stored (scale, zero_point, scale_neg), compact."""

    def setup(self, fq: FakeQuantizer) -> None: ...

    def observe(self, fq: FakeQuantizer, x: torch.Tensor) -> None: ...

    def init(self, fq: FakeQuantizer, x: torch.Tensor) -> None: ...

    def rescale(self, fq: FakeQuantizer, old_qmin: int, old_qmax: int) -> None: ...

    def qparams(self, fq: FakeQuantizer, x: torch.Tensor) -> QParams:
        raise NotImplementedError

    def effective(self, fq: FakeQuantizer) -> Effective:
        return None, None, None

    def forward(self, fq: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
        xv = fq.view(x)
        s, z = self.qparams(fq, x)
        return self.fake_quant(fq, x, xv, s, z).reshape(x.shape)

    def operand(self, fq: FakeQuantizer, x: torch.Tensor) -> Operand:
        """``x`` as a layer op's operand: the affine grid's pieces where this source's fake quant is the
        plain affine one (its ``forward`` and ``fake_quant`` are the base's), else the fake-quantized
        ``x``."""
        cls = type(self)
        if cls.forward is not ScaleSource.forward or cls.fake_quant is not ScaleSource.fake_quant:
            return Operand(self.forward(fq, x))
        vshape = tuple(fq.view(x).shape)
        return Operand(x, *self.qparams(fq, x), (fq.qmin, fq.qmax, vshape))

    # The grid: range -> (scale, zero point), fake quant of the view ``xv`` and its codes.
    def from_range(self, fq: FakeQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        return qparams_from_range(lo, hi, fq.qmin, fq.qmax, fq.spec.symmetric)

    def fake_quant(self, fq: FakeQuantizer, x, xv, s, z) -> torch.Tensor:
        return ste.fake_quant_affine(xv, s, z, fq.qmin, fq.qmax)

    def codes(self, fq: FakeQuantizer, x, xv, s, z) -> torch.Tensor:
        return ste.quantize_affine(xv, s, z, fq.qmin, fq.qmax)


class FP8Grid(ScaleSource):
    """FP8 values: the scale maps the largest magnitude onto the format's largest value; no zero point."""

    def from_range(self, fq, lo, hi):
        s = torch.clamp(torch.maximum(-lo, hi) / ste.FP8_MAX[fq.spec.format], min=SCALE_EPS, max=SCALE_MAX)
        return s, torch.zeros_like(s)

    def fake_quant(self, fq, x, xv, s, z):
        return ste.fake_quant_fp8(xv, s, fq.spec.format)

    def codes(self, fq, x, xv, s, z):
        return ste.round_to_fp8(xv / s, fq.spec.format)


# ---------------------------------------------------------------------------------------- observers, dynamic
class Observed(ScaleSource):
    """minmax / ema / percentile / mse: a range in ``observer.*``, copied into ``scale`` / ``zero_point``."""

    def setup(self, fq):
        spec = fq.spec
        kw = dict(symmetric=spec.symmetric, ema_decay=spec.ema_decay, percentile=spec.percentile)
        acc = fq.role == "activation"  # weights: the range of the current weight
        fq.observer = make_observer(
            spec.scale, fq.stat_shape, accumulate=acc, qmin=fq.qmin, qmax=fq.qmax, **kw
        )
        fq.register_buffer("scale", torch.ones(fq.stat_shape))
        fq.register_buffer("zero_point", torch.zeros(fq.stat_shape))

    @torch.no_grad()
    def observe(self, fq, x):
        fq.observer.update(fq.granularity.rows(x.detach()))
        self._from_observer(fq)

    def rescale(self, fq, old_qmin, old_qmax):
        if bool(fq.observer.initialized):  # once per width change, not per forward
            self._from_observer(fq)

    def _from_observer(self, fq: FakeQuantizer) -> None:
        s, z = self.from_range(fq, fq.observer.min_val, fq.observer.max_val)
        fq.scale.copy_(s)
        fq.zero_point.copy_(z)

    def qparams(self, fq, x):
        return fq.granularity.bcast(fq.scale, x), fq.granularity.bcast(fq.zero_point, x)

    def effective(self, fq):
        return fq.scale.detach(), fq.zero_point.detach(), None


class FP8Observed(FP8Grid, Observed):
    """FP8 with an observed range."""


class Dynamic(ScaleSource):
    """Scales computed from each tensor at run time (activations): no state."""

    def qparams(self, fq, x):
        s, z = self.from_range(fq, *finite_range(fq.granularity.rows(x.detach())))
        return fq.granularity.bcast(s, x), fq.granularity.bcast(z, x)


class FP8Dynamic(FP8Grid, Dynamic):
    """FP8 with a scale per tensor / channel / token computed at run time."""


# ---------------------------------------------------------------------------------------- learned
class Learned(ScaleSource):
    """A trained ``scale``: ``first_scale`` of the first tensor (averaged over DDP ranks), then used with
    LSQ's gradient scale."""

    def setup(self, fq):
        fq.scale = nn.Parameter(torch.ones(fq.stat_shape))

    def first_scale(self, fq: FakeQuantizer, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def init(self, fq, x):
        init = self.first_scale(fq, finite(fq.granularity.rows(x.detach().float())))
        init = torch.clamp(init, min=SCALE_EPS, max=SCALE_MAX)  # max: a mean |x| of huge values overflows
        from_rank_zero(init)
        fq.scale.copy_(init.reshape(fq.stat_shape))

    def qparams(self, fq, x):
        s = learned_scale(fq, x, fq.scale)
        return fq.granularity.bcast(s, x), fq.granularity.bcast(torch.zeros_like(s), x)

    def effective(self, fq):
        def positive(p):
            return None if p is None else torch.clamp(p.detach().abs(), min=SCALE_EPS)

        zp = fq.zero_point
        z = None if zp is None else torch.clamp(torch.round(zp.detach()), fq.qmin, fq.qmax)
        return positive(fq.scale), z, positive(fq.scale_neg)


class LSQ(Learned):
    """LSQ (Esser et al., 2020) learned step; asymmetric specs also learn an integer-rounded offset with the
    same gradient scale (LSQ+, Bhalgat et al., 2020). ``spec.init`` picks the first value."""

    def setup(self, fq):
        super().setup(fq)
        if not fq.spec.symmetric:
            fq.zero_point = nn.Parameter(torch.zeros(fq.stat_shape))

    def first_scale(self, fq, rows):
        spec = fq.spec
        if spec.symmetric and spec.init == "lsq":
            return lsq_init_scale(rows, fq.qmax)
        if spec.init == "mse":  # the clipped range with the least quantization error
            lo, hi = MSEObserver(fq.stat_shape, fq.qmin, fq.qmax, spec.symmetric).batch_range(rows)
        else:
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        init, zp = self.from_range(fq, lo, hi)
        if not spec.symmetric:
            from_rank_zero(zp)
            fq.zero_point.copy_(torch.round(zp).reshape(fq.stat_shape))
        return init

    def qparams(self, fq, x):
        if not isinstance(fq.zero_point, nn.Parameter):
            return super().qparams(fq, x)
        s = learned_scale(fq, x, fq.scale)
        zp = ste.grad_scale(fq.zero_point, lsq_grad_scale(fq, x, fq.zero_point))
        z = torch.clamp(ste.round_ste(zp), fq.qmin, fq.qmax)
        return fq.granularity.bcast(s, x), fq.granularity.bcast(z, x)

    def rescale(self, fq, old_qmin, old_qmax):
        if isinstance(fq.zero_point, nn.Parameter):  # LSQ+: keep the real range [lo, hi]
            lo = (old_qmin - torch.round(fq.zero_point)) * fq.scale.abs()
            fq.scale.mul_((old_qmax - old_qmin) / (fq.qmax - fq.qmin))
            zp = torch.round(fq.qmin - lo / torch.clamp(fq.scale.abs(), min=SCALE_EPS))
            fq.zero_point.copy_(torch.clamp(zp, fq.qmin, fq.qmax))
        else:  # the step follows LSQ's own init rule, proportional to 1 / sqrt(Qp)
            fq.scale.mul_(math.sqrt(old_qmax / fq.qmax))


class PACT(LSQ):
    """PACT (Choi et al., 2018): y = quant(clip(x, 0, alpha)), alpha = qmax * step (the parameter).

    Gradients as in the paper: dy/dx = 1 on [0, alpha), dy/dalpha = 1 where x >= alpha and 0 elsewhere
    (the rounding is straight-through). The value is the affine fake quant's, bit for bit. Specs are
    symmetric (the config refuses an offset: the clipped range starts at 0).
    """

    def first_scale(self, fq, rows):
        return rows.amax(dim=1) / fq.qmax  # clipping level alpha = max(x) = qmax * scale

    def fake_quant(self, fq, x, xv, s, z):
        value = ste.fake_quant_affine(xv.detach(), s.detach(), torch.zeros_like(s), fq.qmin, fq.qmax)
        clipped = torch.minimum(torch.clamp(xv, min=0.0), s * fq.qmax)
        return value + (clipped - clipped.detach())

    def rescale(self, fq, old_qmin, old_qmax):
        fq.scale.mul_(old_qmax / fq.qmax)  # keep the clipping level alpha = qmax * step


class FP8LSQ(FP8Grid, Learned):
    """FP8 with a learned scale, initialised to map max |x| onto the format's largest value."""

    def first_scale(self, fq, rows):
        return self.from_range(fq, rows.amin(dim=1), rows.amax(dim=1))[0]


# ---------------------------------------------------------------------------------------- binary / ternary
class BinaryGrid(ScaleSource):
    """{-1, +1} * alpha with the hardtanh STE (BinaryConnect / XNOR-Net); sign(0) = +1."""

    def fake_quant(self, fq, x, xv, s, z):
        return ste.sign_ste(xv) * s

    def codes(self, fq, x, xv, s, z):
        return torch.where(xv >= 0, 1.0, -1.0)


class Rule(ScaleSource):
    """Closed-form (alpha, threshold) per row of the current tensor; ternary values alpha * {-1, 0, +1}
    by default (``z`` carries the threshold) with the papers' plain straight-through gradient dL/dw =
    dL/dw_q (the value is exactly t * alpha: adding 0 is exact)."""

    def alpha_threshold(self, rows: torch.Tensor) -> QParams:
        raise NotImplementedError

    def qparams(self, fq, x):
        alpha, thr = self.alpha_threshold(finite(fq.granularity.rows(x.detach())))
        return fq.granularity.bcast(torch.clamp(alpha, min=SCALE_EPS), x), fq.granularity.bcast(thr, x)

    def fake_quant(self, fq, x, xv, s, z):
        return ste.ternary_ste(xv.detach(), z) * s + (xv - xv.detach())

    def codes(self, fq, x, xv, s, z):
        return (xv > z).float() - (xv < -z).float()


class BinaryMean(BinaryGrid, Rule):
    """XNOR-Net: alpha = mean |w| per row. Binary activations are a plain sign (no scale)."""

    def alpha_threshold(self, rows):
        alpha = rows.abs().mean(dim=1)
        return alpha, torch.zeros_like(alpha)

    def forward(self, fq, x):
        return ste.sign_ste(x) if fq.role == "activation" else super().forward(fq, x)


class BinaryLSQ(BinaryGrid, Learned):
    """Binary with a learned alpha, initialised to mean |w|."""

    def first_scale(self, fq, rows):
        return rows.abs().mean(dim=1)


class TWN(Rule):
    """TWN (Li & Liu, 2016): delta = 0.7 mean|w|, alpha = mean |w| over |w| > delta."""

    def alpha_threshold(self, rows):
        thr = 0.7 * rows.abs().mean(dim=1)
        mask = rows.abs() > thr[:, None]
        return (rows.abs() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1), thr


class AbsMean(Rule):
    """BitNet b1.58 absmean: gamma = mean |w|, w_t = round(clamp(w / gamma, -1, 1))."""

    def alpha_threshold(self, rows):
        gamma = rows.abs().mean(dim=1)
        return gamma, 0.5 * gamma


class TTQ(Learned):
    """TTQ (Zhu et al., 2017): +Wp (``scale``) above t*max|w|, -Wn (``scale_neg``) below -t*max|w|
    (t = 0.05), 0 between. Wp / Wn get the summed gradients of their positions; the latent weight gets the
    gradient scaled by Wp, 1 or Wn in the three regions (the paper's eq. 8)."""

    def setup(self, fq):
        super().setup(fq)
        fq.scale_neg = nn.Parameter(torch.ones(fq.stat_shape))

    def first_scale(self, fq, rows):
        return rows.abs().mean(dim=1)

    @torch.no_grad()
    def init(self, fq, x):
        super().init(fq, x)
        fq.scale_neg.copy_(fq.scale)

    @staticmethod
    def _threshold(fq: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
        return fq.granularity.bcast(0.05 * finite(fq.granularity.rows(x.detach())).abs().amax(dim=1), x)

    def fake_quant(self, fq, x, xv, s, z):
        thr = self._threshold(fq, x)
        neg = fq.granularity.bcast(learned_scale(fq, x, fq.scale_neg), x)
        xd = xv.detach()
        pos_mask, neg_mask = xd > thr, xd < -thr
        value = torch.where(pos_mask, s, torch.where(neg_mask, -neg, torch.zeros_like(xd)))
        g = torch.where(pos_mask, s.detach(), torch.where(neg_mask, neg.detach(), torch.ones_like(xd)))
        return value + (xv - xd) * g

    def codes(self, fq, x, xv, s, z):
        thr = self._threshold(fq, x)
        return (xv > thr).float() - (xv < -thr).float()
