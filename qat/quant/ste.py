"""Straight-through-estimator building blocks: pure tensor functions, no state.

The rounding helpers are ``x + (f(x) - x).detach()`` style expressions or plain differentiable ops, so
autograd produces their STE gradients. The fake quant of the integer and FP8 grids, which every training
step runs on every quantized tensor, are fused autograd Functions with the same values and gradients
(one buffer forward, a mask and the codes saved). ``torch.compile`` traces all of them without a graph
break and fuses each into one kernel.
"""

from __future__ import annotations

import torch

from qat.config import FP8_FORMATS
from qat.quant import kernels


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ``torch.fake_quantize_*``), gradient 1."""
    return x + (torch.round(x) - x).detach()


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (C's ``roundf``, as in llama.cpp's reference quantizers), computed as
    ``gguf.quants.np_roundf`` does (exact for every float); a zero is +0, as an integer code. No gradient
    (use it inside a straight-through expression)."""
    a = x.abs()
    floor = torch.floor(a)
    return torch.sign(x) * (floor + torch.floor(2 * (a - floor))) + 0.0


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` (LSQ's 1/sqrt(N*Qp))."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


# ---------------------------------------------------------------------------------------- fused fake quant
# Each grid's fake quant is one autograd Function (``AffineFakeQuant``, ``FP8FakeQuant``): the forward
# computes the value in one chain of in-place ops on one buffer and saves only what the backward needs,
# a bool mask of the clipped values and, when the scale (or zero point) is learned, the codes
# (int8/uint8; FP8 values as float8) and the input (a weight, or an activation its producer usually keeps
# anyway). The backward runs the float operations autograd runs through the straight-through expression
# ``y = (clamp(round_ste(x * (1/s)) + z) - z) * s + (x - x.detach()) * mask``, in the same order, so values
# and gradients are that expression's bit for bit (for finite inputs; the tests compare the two).
def _code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    """The integer dtype that holds the codes qmin..qmax exactly (None: keep them as floats)."""
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.uint8 if qmin >= 0 and qmax <= 255 else None


def _raw_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``round(x * (1/s)) + z`` (as torch's fake quant: a multiply by the reciprocal), in a new buffer."""
    return torch.mul(x, torch.reciprocal(scale)).round_().add_(zero_point)


def _clamp(q: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` clamped to [lo, hi], and the mask of the values outside (NaN included): where the
    straight-through gradient stops (:func:`_stopped`). Eager: a bool mask, using up ``q``'s buffer (a
    subtraction and a cast to bool, three times faster on CPU than two comparisons). Compiled: 0/1 bytes
    (``ceil(|q - clamped|)`` is 0 inside, >= 1 outside, NaN for NaN, which ``fmin`` turns into 1), as
    inductor's CPU kernels store bool tensors ten times slower than bytes."""
    clamped = torch.clamp(q, lo, hi)
    if torch.compiler.is_compiling():
        moved = torch.fmin((q - clamped).abs().ceil(), torch.ones((), dtype=q.dtype, device=q.device))
        return clamped, moved.to(torch.uint8)
    return clamped, q.sub_(clamped).to(torch.bool)


def _stopped(clipped: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` where the mask of :func:`_clamp` is 0, else 0. Eager: ``where`` (five times faster on CPU than
    ``g * mask``, whose bool -> float conversion also makes -0 of a negative ``g``: a zero either way).
    Compiled: ``g * (1 - mask)``, so that the partitioner keeps the mask as bytes (a bool it would store)."""
    if torch.compiler.is_compiling():
        return g * (1 - clipped.to(g.dtype))
    fused = kernels.stopped(clipped, g)
    return torch.where(clipped, 0.0, g) if fused is None else fused


def _as_codes(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The clamped codes ``q`` (integer-valued floats) in the narrowest dtype that holds them exactly."""
    dtype = _code_dtype(qmin, qmax)
    return q.clone() if dtype is None else q.to(dtype)


def affine_parts(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, keep_codes: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward pass of :class:`AffineFakeQuant`: the value, the clip mask (:func:`_clamp`) and, when
    ``keep_codes``, the codes (:func:`_as_codes`; :func:`affine_dequant` gives the value back from them).
    In one pass of :func:`qat.quant.kernels.affine_rows` where it applies (the same bits)."""
    if not keep_codes or _code_dtype(qmin, qmax) is not None:
        fused = kernels.affine_rows(
            x, scale, zero_point, qmin, qmax, _code_dtype(qmin, qmax) if keep_codes else None
        )
        if fused is not None:
            return fused
    q, clipped = _clamp(_raw_codes(x, scale, zero_point), qmin, qmax)
    codes = _as_codes(q, qmin, qmax) if keep_codes else None
    # + (x - x): 0 for finite x (as the unfused straight-through sum adds), NaN for inf/NaN, so a
    # non-finite weight or input shows in the forward pass as before (the training guards rely on it).
    # Eager adds it as ``+ 0 * x`` in place (no temporary; the value is never -0, so the sign of the
    # zero added does not matter); traced, as written.
    y = q.sub_(zero_point).mul_(scale)
    return (y.add_(x - x) if torch.compiler.is_compiling() else y.add_(x, alpha=0)), clipped, codes


def affine_dequant(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The value of :func:`affine_parts` from its codes (bit for bit, for a finite input of ``dtype``)."""
    if dtype == torch.float32:
        fused = kernels.dequant_rows(codes, scale, zero_point)
        if fused is not None:
            return fused
    return codes.to(dtype).sub_(zero_point).mul_(scale)


def affine_grads(
    g: torch.Tensor,
    clipped: torch.Tensor,
    codes: torch.Tensor | None,
    x: torch.Tensor | None,
    s: torch.Tensor,
    z: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass of :class:`AffineFakeQuant` for the output gradient ``g``: the gradients of
    (x, scale, zero_point) where ``needs`` says (the last two need ``codes`` and ``x``)."""
    gx = _stopped(clipped, g) if needs[0] else None
    if not (needs[1] or needs[2]):
        return gx, None, None
    gd = g * s  # y = d * s, d = q - z
    gs = gz = None
    if needs[1]:
        gs = (g * (codes.to(g.dtype) - z)).sum_to_size(s.shape)
    gq = _stopped(clipped, gd)  # q = clamp(q_raw): the gradient of q_raw = round_ste(x * r) + z
    if needs[2]:
        gz = gq.sum_to_size(z.shape) + gd.sum_to_size(z.shape).neg()
    if needs[1]:
        r = torch.reciprocal(s)
        gr = (gq * x).sum_to_size(r.shape)
        gs = gs + -gr * (r * r)  # d(1/s)/ds = -1/s^2
    return gx, gs, gz


class AffineFakeQuant(torch.autograd.Function):
    """Integer-grid fake quant ``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` with the clipped STE for
    ``x`` and, for a learned ``s`` / ``z`` (LSQ / LSQ+), their gradients (see :func:`fake_quant_affine`)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        ctx.learned = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        y, clipped, codes = affine_parts(x, scale, zero_point, qmin, qmax, ctx.learned)
        if ctx.learned:  # the codes and the input: what d/ds and d/dz need
            ctx.save_for_backward(clipped, codes, x, scale, zero_point)
        else:
            ctx.save_for_backward(clipped)
        return y

    @staticmethod
    def backward(ctx, g):
        clipped, *rest = ctx.saved_tensors
        codes, x, s, z = rest if ctx.learned else (None, None, None, None)
        return *affine_grads(g, clipped, codes, x, s, z, ctx.needs_input_grad[:3]), None, None


def fake_quant_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Affine fake quantization with a clipped STE for ``x`` and LSQ gradients for ``scale``.

    Numerics follow ``torch.fake_quantize_per_*_affine`` exactly: ``q = clamp(round(x * (1/s)) + z)``,
    ``y = (q - z) * s``. The gradient w.r.t. ``x`` is 1 inside the clipping range and 0 outside (routed as
    ``mask * grad``, so it equals torch's fake-quant gradient bit for bit); when ``scale`` requires grad it
    gets the LSQ gradient (``round(x/s) - x/s`` inside, the clip level outside). ``zero_point`` holds
    integer values in a float tensor (it may carry a straight-through gradient). One pass of
    :class:`AffineFakeQuant` when autograd is on, the same value without it.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        return AffineFakeQuant.apply(x, scale, zero_point, qmin, qmax)
    return quantize_affine(x, scale, zero_point, qmin, qmax).sub_(zero_point).mul_(scale)


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The integer codes that :func:`fake_quant_affine` would dequantize (float tensor, no gradient)."""
    return _raw_codes(x, scale, zero_point).clamp_(qmin, qmax)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1, gradient 1 where |x| <= 1 and 0 elsewhere (BinaryConnect / hardtanh STE)."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    clipped = torch.clamp(x, -1.0, 1.0)
    return clipped + (s - clipped).detach()


def ternary_ste(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} by ``|x| > threshold``, gradient 1 (straight through)."""
    t = (x > threshold).to(x.dtype) - (x < -threshold).to(x.dtype)
    return x + (t - x).detach()


def _fp8_params(fmt: str) -> tuple[int, int, float]:
    """(mantissa bits, minimum normal exponent, largest finite value) of the OCP FP8 formats."""
    if fmt == "fp8_e4m3":
        return 3, -6, 448.0
    if fmt == "fp8_e5m2":
        return 2, -14, 57344.0
    raise ValueError(f"format: {fmt!r} is not an FP8 format; allowed: fp8_e4m3, fp8_e5m2")


# Largest finite value of each FP8 format (the scale maps a tensor's largest magnitude onto it), and the
# torch dtype that holds its values exactly.
FP8_MAX = {fmt: _fp8_params(fmt)[2] for fmt in FP8_FORMATS}
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def round_to_fp8(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round to the nearest value representable in ``fmt`` (ties to even), saturating at the largest.

    Written in float arithmetic (frexp-free) so it runs on every backend and equals a cast to
    ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` for finite inputs within range.
    """
    mbits, emin, fmax = _fp8_params(fmt)
    xc = torch.clamp(x, -fmax, fmax)
    ax = xc.abs()
    # Exponent of each value, floored at the subnormal exponent; the spacing there is 2^(e - mbits).
    e = torch.floor(torch.log2(torch.clamp(ax, min=2.0**emin)))
    step = torch.exp2(e - mbits)
    y = torch.round(xc / step) * step
    return torch.clamp(y, -fmax, fmax)


class FP8FakeQuant(torch.autograd.Function):
    """FP8 fake quant ``round_to_fp8(x / s) * s``, saturating, with the STE for ``x`` inside the range and,
    for a learned ``s``, its gradient (see :func:`fake_quant_fp8`)."""

    @staticmethod
    def forward(ctx, x, scale, fmt):
        _, _, fmax = _fp8_params(fmt)
        r = torch.reciprocal(scale)
        xs = torch.mul(x, r)
        v = round_to_fp8(xs, fmt).add_(0.0)  # + 0.0: the straight-through sum turns -0 into +0
        clipped = _clamp(xs, -fmax, fmax)[1]
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(clipped, v.to(FP8_DTYPES[fmt]), x, scale)
            ctx.dtype = v.dtype
        else:
            ctx.save_for_backward(clipped)
        return v.mul_(scale)

    @staticmethod
    def backward(ctx, g):
        clipped, *rest = ctx.saved_tensors
        gx = _stopped(clipped, g) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return gx, None, None
        codes, x, s = rest
        gs = (g * codes.to(ctx.dtype)).sum_to_size(s.shape)  # y = v * s
        gxc = _stopped(clipped, g * s)  # v = clamp(x * r) (+ the rounding, straight through)
        r = torch.reciprocal(s)
        gr = (gxc * x).sum_to_size(r.shape)
        return gx, gs + -gr * (r * r), None


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP8 fake quantization of ``x / scale`` (``x * (1/scale)``) with a straight-through gradient inside
    the range (exactly 1 inside, 0 beyond the largest value: saturating) and, for a learned ``scale``, the
    LSQ-style gradient (the clip level outside). One pass of :class:`FP8FakeQuant`."""
    return FP8FakeQuant.apply(x, scale, fmt)
