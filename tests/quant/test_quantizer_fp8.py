"""FakeQuantizer with FP8 formats: observed, dynamic and learned scales against torch's float8 casts."""

from __future__ import annotations

import pytest
import torch
from helpers.quantizers import FP8, fq

from qat.quant.qparams import SCALE_EPS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- fp8
@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_static_per_channel(fmt: str) -> None:
    dt, fmax = FP8[fmt]
    w = torch.randn(4, 8) * torch.tensor([1e-3, 1.0, 10.0, 1e3])[:, None]
    q = fq(shape=w.shape, format=fmt, granularity="per_channel")
    y = q(w)
    s = q.scale[:, None]
    assert torch.allclose(q.scale, torch.clamp(w.abs().amax(1) / fmax, min=SCALE_EPS))
    assert torch.equal(y, (w * torch.reciprocal(s)).to(dt).float() * s)


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_dynamic_per_token(fmt: str) -> None:
    dt, fmax = FP8[fmt]
    x = torch.randn(3, 5, 8)
    q = fq("activation", format=fmt, granularity="per_token", dynamic=True)
    s = x.abs().amax(-1, keepdim=True) / fmax
    assert torch.equal(q(x), (x * torch.reciprocal(s)).to(dt).float() * s)


def test_fp8_lsq_init_and_codes() -> None:
    w = torch.randn(4, 8)
    q = fq(shape=w.shape, format="fp8_e4m3", scale="lsq")
    y = q(w)
    assert q.learned and torch.allclose(q.scale.detach(), w.abs().amax().reshape(1) / 448)
    codes, s, _ = q.quantize(w)
    assert torch.allclose(codes * s, y.detach())
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())
