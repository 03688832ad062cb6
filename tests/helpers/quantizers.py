"""Building blocks of the FakeQuantizer tests (``tests/quant/test_quantizer*.py``)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from qat.config import QuantSpec
from qat.quant.quantizer import FakeQuantizer

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}

int_formats = st.builds(lambda b, s: f"{'int' if s else 'uint'}{b}", st.integers(2, 8), st.booleans())


def fq(role: str = "weight", shape=None, act_axis: int = -1, **spec) -> FakeQuantizer:
    return FakeQuantizer(QuantSpec(**spec), role, shape, name="layer", act_axis=act_axis)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def torch_per_channel(x: torch.Tensor, q: FakeQuantizer, axis: int) -> torch.Tensor:
    """torch's own per-channel fake quant with ``q``'s observed scale and zero point."""
    return torch.fake_quantize_per_channel_affine(
        x, q.scale.flatten(), q.zero_point.flatten().to(torch.int32), axis, q.qmin, q.qmax
    )


def grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x)`` and the gradient of ``<fn(x), g>`` w.r.t. ``x``."""
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad
