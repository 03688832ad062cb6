"""The straight-through expressions the fused fake-quant Functions of ``qat.quant.ste`` replace, kept as
their oracle: autograd differentiates these plain ops, the fused backward must give the same bits."""

from __future__ import annotations

import torch

from qat.quant.ste import FP8_MAX, round_ste, round_to_fp8


def fake_quant_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    q_raw = round_ste(x.detach() * torch.reciprocal(scale)) + zero_point
    q = torch.clamp(q_raw, qmin, qmax)
    y = (q - zero_point) * scale
    return y + (x - x.detach()) * ((q_raw >= qmin) & (q_raw <= qmax))


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    xs = x.detach() * torch.reciprocal(scale)
    fmax = FP8_MAX[fmt]
    xc = torch.clamp(xs, -fmax, fmax)
    y = (xc + (round_to_fp8(xs, fmt) - xc).detach()) * scale
    return y + (x - x.detach()) * (xs.abs() <= fmax)
