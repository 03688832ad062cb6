"""Straight-through-estimator building blocks: pure tensor functions, no state.

Everything is written as ``x + (f(x) - x).detach()`` style expressions or plain differentiable ops so that
autograd produces the STE gradients and ``torch.compile`` can fuse the whole fake-quant into one kernel.
"""

from __future__ import annotations

import torch

from qat.config import FP8_FORMATS


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ``torch.fake_quantize_*``), gradient 1."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` (LSQ's 1/sqrt(N*Qp))."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def fake_quant_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Affine fake quantization with a clipped STE for ``x`` and LSQ gradients for ``scale``.

    Numerics follow ``torch.fake_quantize_per_*_affine`` exactly: ``q = clamp(round(x * (1/s)) + z)``,
    ``y = (q - z) * s``. The gradient w.r.t. ``x`` is 1 inside the clipping range and 0 outside; when
    ``scale`` requires grad it gets the LSQ gradient (``round(x/s) - x/s`` inside, the clip level outside).
    ``zero_point`` holds integer values in a float tensor (it may carry a straight-through gradient).

    The gradient w.r.t. ``x`` is routed separately as ``mask * grad`` (not through ``* (1/s) ... * s``,
    whose float product is not always exactly 1), so it equals torch's fake-quant gradient bit for bit.
    """
    needs_grad = x.requires_grad or scale.requires_grad or zero_point.requires_grad
    if not (torch.is_grad_enabled() and needs_grad):
        # No autograd (evaluation, calibration): the same value without the STE terms, which are exact
        # no-ops in the forward pass (v + (round(v) - v) == round(v) in float arithmetic).
        return (quantize_affine(x, scale, zero_point, qmin, qmax) - zero_point) * scale
    q_raw = round_ste(x.detach() * torch.reciprocal(scale)) + zero_point
    q = torch.clamp(q_raw, qmin, qmax)
    y = (q - zero_point) * scale
    return y + (x - x.detach()) * ((q_raw >= qmin) & (q_raw <= qmax))


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The integer codes that :func:`fake_quant_affine` would dequantize (float tensor, no gradient)."""
    return torch.clamp(torch.round(x * torch.reciprocal(scale)) + zero_point, qmin, qmax)


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


# Largest finite value of each FP8 format (the scale maps a tensor's largest magnitude onto it).
FP8_MAX = {fmt: _fp8_params(fmt)[2] for fmt in FP8_FORMATS}


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


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP8 fake quantization of ``x / scale`` with a straight-through gradient inside the range."""
    xs = x.detach() * torch.reciprocal(scale)
    _, _, fmax = _fp8_params(fmt)
    xc = torch.clamp(xs, -fmax, fmax)  # gives ``scale`` its LSQ-style gradient (the clip level outside)
    y = (xc + (round_to_fp8(xs, fmt) - xc).detach()) * scale
    # Saturating: the gradient w.r.t. x is exactly 1 inside the range and 0 beyond the largest value.
    return y + (x - x.detach()) * (xs.abs() <= fmax)
