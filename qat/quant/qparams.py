"""Scale / zero-point arithmetic shared by observers, quantizers and the exporter (one definition)."""

from __future__ import annotations

import torch

# Smallest scale any quantizer will use: keeps 1/scale finite for all-zero or constant tensors.
SCALE_EPS = float(torch.finfo(torch.float32).eps)
# Largest: a range near the float32 limit (an overflowing activation) would otherwise give a scale whose
# products (qmax * scale, the LSQ gradient) overflow to inf/NaN. No sane tensor comes near 2**100.
SCALE_MAX = 2.0**100


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for the range [lo, hi]; zero_point is an integer-valued float tensor.

    Symmetric signed: ``scale = max|x| / qmax``, zero point 0. Symmetric unsigned (qmin == 0):
    ``scale = max(x) / qmax``. Asymmetric: the range is widened to contain 0 (so 0 is exact) and
    ``zero_point = qmin - round(lo / scale)``.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        bound = hi if qmin == 0 else torch.maximum(-lo, hi)
        scale = torch.clamp(bound / qmax, min=SCALE_EPS, max=SCALE_MAX)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS, max=SCALE_MAX)  # hi - lo may overflow
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def lsq_init_scale(rows: torch.Tensor, qmax: int) -> torch.Tensor:
    """LSQ initial step size per row: ``2 * mean|x| / sqrt(Qp)`` (Esser et al., 2020)."""
    return torch.clamp(2.0 * rows.abs().mean(dim=1) / (qmax**0.5), min=SCALE_EPS, max=SCALE_MAX)
