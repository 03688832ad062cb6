"""No input makes a quantizer's scale NaN/inf/zero or poisons its observer: inf/NaN, all-zero, constant and
huge-outlier tensors, fed as the first batch (initialisation) and after a normal batch, for every scale
source. Non-finite values are ignored (treated as 0), scales are clamped to [SCALE_EPS, SCALE_MAX].

Two properties, each one Hypothesis test: the quantizers (every scale source, role and granularity) are
drawn from ``QUANTIZERS``; a bad batch is ordinary data, or a constant tensor, with a few values replaced
(``Batch``). The named edge cases (``EDGES``) are pinned with ``@example`` so every quantizer meets at least
two of them, each edge case is seen both as the first batch and after a normal one, and every run draws
the same cases (``derandomize``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qat.config import QuantSpec
from qat.quant.qparams import SCALE_EPS, SCALE_MAX, lsq_init_scale, qparams_from_range
from qat.quant.quantizer import FakeQuantizer

BIG = torch.finfo(torch.float32).max
NAN, INF = float("nan"), float("inf")
SHAPE = (4, 16)


def _normal(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


class Batch(NamedTuple):
    """A batch: ordinary data (``fill`` None) or a tensor full of ``fill``, with ``spikes`` set on top."""

    fill: float | None = None
    spikes: tuple[tuple[float, int, int], ...] = ()  # (value, row, column)

    def tensor(self) -> torch.Tensor:
        x = _normal(1) if self.fill is None else torch.full(SHAPE, self.fill)
        for value, i, j in self.spikes:
            x[i, j] = value
        return x


EDGES = {
    "nan": Batch(spikes=((NAN, 0, 3), (NAN, 2, 7))),
    "inf": Batch(spikes=((INF, 1, 3),)),
    "-inf": Batch(spikes=((-INF, 3, 5),)),
    "all_nan": Batch(fill=NAN),
    "all_zero": Batch(fill=0.0),
    "constant": Batch(fill=3.0),
    "negative_constant": Batch(fill=-3.0),
    "outlier_1e30": Batch(spikes=((1e30, 0, 0),)),
    "outlier_float_max": Batch(spikes=((BIG, 0, 0), (-BIG, 0, 1))),  # the range max - min overflows
    "all_float_max": Batch(fill=BIG),
}
NON_FINITE_EDGES = ["nan", "inf", "-inf", "all_nan"]

# Every scale source of the int formats, their asymmetric variants, and the other families' sources, which
# share the same clamping: dynamic scales, fp8, binary/ternary rules.
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


# (source, role, granularity): every source in every role it serves, weights per tensor and per channel.
QUANTIZERS = [
    (src, role, gran)
    for src in SOURCES
    for role in _roles(src)
    for gran in (("per_tensor", "per_channel") if role == "weight" and src != "pact" else ("per_tensor",))
]
OBSERVED = [
    s
    for s, spec in SOURCES.items()
    if spec.get("scale", "minmax") in ("minmax", "ema", "percentile", "mse") and not spec.get("dynamic")
]

# Values a bad batch is made of: the float32 extremes and non-finite values, and any float32 at all.
EXTREMES = st.sampled_from([NAN, INF, -INF, 0.0, BIG, -BIG, 1e30, -1e30])
VALUES = EXTREMES | st.floats(width=32)
SPIKES = st.lists(st.tuples(VALUES, st.integers(0, SHAPE[0] - 1), st.integers(0, SHAPE[1] - 1)), max_size=4)
BATCHES = st.builds(Batch, fill=st.none() | VALUES, spikes=SPIKES.map(tuple))
# Ordinary data with some values NaN or +-inf (or a tensor that is NaN throughout).
NON_FINITE = st.builds(
    Batch,
    fill=st.sampled_from([None, None, None, NAN]),
    spikes=st.lists(
        st.tuples(st.sampled_from([NAN, INF, -INF]), st.integers(0, 3), st.integers(0, 15)), min_size=1
    ).map(tuple),
)


def _quantizer(src: str, role: str, gran: str) -> FakeQuantizer:
    spec = dict(SOURCES[src])
    spec.setdefault("granularity", gran)
    return FakeQuantizer(QuantSpec(**spec), role, shape=SHAPE, name="layer").train()


def _non_finite_state(fq: FakeQuantizer) -> list[str]:
    return [k for k, v in fq.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _edge_examples(test):
    """Every quantizer meets two named edge cases, one as its first batch and one after a normal batch;
    the edge cases rotate so each is seen both ways."""
    names = list(EDGES)
    for i, quantizer in enumerate(QUANTIZERS):
        first, after = names[i % len(names)], names[(i + len(names) // 2) % len(names)]
        test = example(quantizer=quantizer, batch=EDGES[first], first=True)(test)
        test = example(quantizer=quantizer, batch=EDGES[after], first=False)(test)
    return test


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(quantizer=st.sampled_from(QUANTIZERS), batch=st.sampled_from(list(EDGES.values())) | BATCHES,
       first=st.booleans())  # fmt: skip
@_edge_examples
def test_bad_batch_leaves_finite_positive_scales(quantizer, batch, first):
    fq = _quantizer(*quantizer)
    if not first:
        fq(_normal())
    fq(batch.tensor())
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


def _observer_examples(test):
    """Every observed source meets two of the named non-finite edge cases; each case is met by several."""
    names = NON_FINITE_EDGES
    for i, src in enumerate(OBSERVED):
        for name in (names[i % len(names)], names[(i + 1) % len(names)]):
            test = example(src=src, batch=EDGES[name])(test)
    return test


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(src=st.sampled_from(OBSERVED), batch=NON_FINITE)
@_observer_examples
def test_observers_ignore_non_finite_values(src, batch):
    """A batch with inf/NaN moves an observer exactly as the same batch with those values set to 0."""
    x = batch.tensor()
    cleaned = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    seen, reference = _quantizer(src, "activation", "per_tensor"), _quantizer(src, "activation", "per_tensor")
    for fq, data in ((seen, x), (reference, cleaned)):
        fq(_normal())
        fq(data)
    for key, value in reference.state_dict().items():
        assert torch.equal(seen.state_dict()[key], value), key


def test_qparams_of_ranges_at_the_float32_limit_stay_finite():
    lo, hi = torch.tensor([-BIG, 0.0, -1.0]), torch.tensor([BIG, 0.0, 1.0])
    for symmetric in (True, False):
        scale, zp = qparams_from_range(lo, hi, -8, 7, symmetric)
        assert torch.isfinite(scale).all() and torch.isfinite(zp).all()
        assert (scale >= SCALE_EPS).all() and (scale <= SCALE_MAX).all()
    assert lsq_init_scale(torch.full((2, 64), BIG), 7).tolist() == [SCALE_MAX, SCALE_MAX]
