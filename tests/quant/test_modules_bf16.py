"""Prepared models in bf16: cast with ``model.to(torch.bfloat16)`` (the quantizers' state with the weights)
and under CPU bf16 autocast, in training (forward + backward) and in eval (the integer GEMM path too)."""

from __future__ import annotations

import pytest
import torch
from helpers.quantizers import randn
from torch import nn

import qat

SCHEMES = {
    "w4a4": dict(weight=dict(format="int4", granularity="per_channel", scale="lsq"),
                 activation=dict(format="int4", symmetric=False, scale="lsq")),
    "w4g8a8dyn": dict(weight=dict(format="int4", granularity="per_group", group_size=8, scale="lsq"),
                      activation=dict(format="int8", granularity="per_token", symmetric=False, dynamic=True)),
    "w8a8": dict(weight=dict(format="int8", granularity="per_channel"),
                 activation=dict(format="uint8", symmetric=False)),
}  # fmt: skip


def _model(scheme: str) -> tuple[nn.Module, torch.Tensor]:
    """Linear -> LayerNorm -> Linear: a quantized layer feeding a float layer with bf16 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    qat.prepare(model, SCHEMES[scheme])
    x = randn(0, 4, 5, 16)
    qat.calibrate(model, [(x, None)], num_batches=1)
    return model, x


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_model_cast_to_bf16_trains_and_evaluates(scheme) -> None:
    model, x = _model(scheme)
    model.to(torch.bfloat16).train()
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    model.eval()
    with torch.no_grad():  # the integer eval path gives the layer's dtype
        assert model(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_autocast_trains_and_evaluates(scheme) -> None:
    model, x = _model(scheme)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).isfinite().all()
