"""No input makes a quantizer's scale NaN/inf/zero or poisons its observer: inf/NaN, all-zero, constant and
huge-outlier tensors, fed as the first batch (initialisation) and after a normal batch, for every scale
source. Non-finite values are ignored (treated as 0), scales are clamped to [SCALE_EPS, SCALE_MAX]."""

from __future__ import annotations

import pytest
import torch

from qat.config import QuantSpec
from qat.quant.qparams import SCALE_EPS, SCALE_MAX, lsq_init_scale, qparams_from_range
from qat.quant.quantizer import FakeQuantizer

BIG = torch.finfo(torch.float32).max
SHAPE = (4, 16)


def _normal(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _with(value: float, *where: tuple[int, int]) -> torch.Tensor:
    x = _normal(1)
    for i, j in where:
        x[i, j] = value
    return x


BAD_INPUTS = {
    "nan": _with(float("nan"), (0, 3), (2, 7)),
    "inf": _with(float("inf"), (1, 3)),
    "-inf": _with(float("-inf"), (3, 5)),
    "all_nan": torch.full(SHAPE, float("nan")),
    "all_zero": torch.zeros(SHAPE),
    "constant": torch.full(SHAPE, 3.0),
    "negative_constant": torch.full(SHAPE, -3.0),
    "outlier_1e30": _with(1e30, (0, 0)),
    "outlier_float_max": _with(BIG, (0, 0)) * torch.where(torch.arange(16) == 1, -1.0, 1.0),
    "all_float_max": torch.full(SHAPE, BIG),
}

# Every scale source of the int formats (the list), their asymmetric variants, and the other
# families' sources, which share the same clamping: dynamic scales, fp8, binary/ternary rules.
SOURCES = {
    "minmax": {"format": "int8", "scale": "minmax"},
    "minmax_asym": {"format": "int8", "scale": "minmax", "symmetric": False},
    "ema": {"format": "int8", "scale": "ema"},
    "ema_asym": {"format": "int8", "scale": "ema", "symmetric": False},
    "percentile": {"format": "int8", "scale": "percentile", "percentile": 99.0},
    "mse": {"format": "int4", "scale": "mse"},
    "mse_asym": {"format": "int4", "scale": "mse", "symmetric": False},
    "lsq": {"format": "int4", "scale": "lsq"},
    "lsq_plus": {"format": "int4", "scale": "lsq", "symmetric": False},
    "pact": {"format": "uint4", "scale": "pact"},
    "dynamic_per_token": {"format": "int8", "dynamic": True, "granularity": "per_token"},
    "fp8_minmax": {"format": "fp8_e4m3"},
    "fp8_lsq": {"format": "fp8_e4m3", "scale": "lsq"},
    "binary_mean": {"format": "binary", "scale": "mean"},
    "ternary_twn": {"format": "ternary", "scale": "twn"},
    "ternary_absmean": {"format": "ternary", "scale": "absmean"},
    "ternary_ttq": {"format": "ternary", "scale": "ttq"},
}
WEIGHT_ONLY = {"binary_mean", "ternary_twn", "ternary_absmean", "ternary_ttq"}


def _roles(name: str) -> list[str]:
    if name.startswith("dynamic"):
        return ["activation"]
    if name in WEIGHT_ONLY:
        return ["weight"]
    return ["weight", "activation"]


CASES = [
    (src, role, gran, bad, first)
    for src in SOURCES
    for role in _roles(src)
    for gran in (("per_tensor", "per_channel") if role == "weight" and src != "pact" else ("per_tensor",))
    for bad in BAD_INPUTS
    for first in (True, False)
]


def _quantizer(src: str, role: str, gran: str) -> FakeQuantizer:
    spec = dict(SOURCES[src])
    spec.setdefault("granularity", gran)
    return FakeQuantizer(QuantSpec(**spec), role, shape=SHAPE, name="layer").train()


def _non_finite_state(fq: FakeQuantizer) -> list[str]:
    return [k for k, v in fq.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


@pytest.mark.parametrize(
    "src,role,gran,bad,first",
    CASES,
    ids=[f"{s}-{r}-{g}-{b}-{'first' if f else 'after'}" for s, r, g, b, f in CASES],
)
def test_bad_batch_leaves_finite_positive_scales(src, role, gran, bad, first):
    fq = _quantizer(src, role, gran)
    if not first:
        fq(_normal())
    fq(BAD_INPUTS[bad])
    assert _non_finite_state(fq) == []
    probe = _normal(2)
    scale, zero_point = fq.qparams(probe)
    assert torch.isfinite(scale).all() and (scale >= SCALE_EPS).all() and (scale <= SCALE_MAX).all()
    assert torch.isfinite(zero_point).all()
    out = fq(probe)  # the quantizer still works on ordinary data
    assert torch.isfinite(out).all()
    if fq.learned:  # and a learned scale gets a finite gradient from it
        out.sum().backward()
        assert torch.isfinite(fq.scale.grad).all()


OBSERVED = [s for s in SOURCES if SOURCES[s].get("scale", "minmax") in ("minmax", "ema", "percentile", "mse")]
OBSERVED = [s for s in OBSERVED if not SOURCES[s].get("dynamic")]


@pytest.mark.parametrize("src", OBSERVED)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "all_nan"])
def test_observers_ignore_non_finite_values(src, bad):
    """A batch with inf/NaN moves an observer exactly as the same batch with those values set to 0."""
    x = BAD_INPUTS[bad]
    cleaned = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    seen, reference = _quantizer(src, "activation", "per_tensor"), _quantizer(src, "activation", "per_tensor")
    for fq, batch in ((seen, x), (reference, cleaned)):
        fq(_normal())
        fq(batch)
    for key, value in reference.state_dict().items():
        assert torch.equal(seen.state_dict()[key], value), key


def test_qparams_of_ranges_at_the_float32_limit_stay_finite():
    lo, hi = torch.tensor([-BIG, 0.0, -1.0]), torch.tensor([BIG, 0.0, 1.0])
    for symmetric in (True, False):
        scale, zp = qparams_from_range(lo, hi, -8, 7, symmetric)
        assert torch.isfinite(scale).all() and torch.isfinite(zp).all()
        assert (scale >= SCALE_EPS).all() and (scale <= SCALE_MAX).all()
    assert lsq_init_scale(torch.full((2, 64), BIG), 7).tolist() == [SCALE_MAX, SCALE_MAX]
