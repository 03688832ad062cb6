"""FakeQuantizer, what every scale source shares: construction errors, the enable flags, the codes export
stores, state in buffers (state_dict, pickling, no host syncs: no dynamo graph breaks), the registry of
scale sources and the public read-only surface other modules use."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers.quantizers import fq
from torch import nn

from qat.config import SCALES_BY_KIND, QuantConfigError, QuantSpec
from qat.quant.quantizer import SOURCES, FakeQuantizer, source_key


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- construction errors
def test_bad_role() -> None:
    with pytest.raises(ValueError, match=r"role: 'bias' is not valid; allowed: weight, activation"):
        FakeQuantizer(QuantSpec(), "bias")


def test_per_channel_needs_shape() -> None:
    with pytest.raises(ValueError, match="needs the tensor shape"):
        fq(granularity="per_channel")


def test_axis_out_of_range_message() -> None:
    with pytest.raises(QuantConfigError) as ei:
        fq(shape=(4, 3, 2, 2), granularity="per_channel", axis=4)
    msg = str(ei.value)
    assert msg.startswith("quant.weight.axis: 4 is out of range for layer 'layer'")
    assert "(4, 3, 2, 2)" in msg and "allowed: -4..3" in msg


def test_group_size_must_divide_the_input_dimension() -> None:
    with pytest.raises(QuantConfigError) as ei:
        fq(shape=(4, 3, 3, 3), granularity="per_group", group_size=5)
    msg = str(ei.value)
    assert msg.startswith(
        "quant.weight.group_size: 5 does not divide the input dimension 27 of layer 'layer'"
    )
    assert "allowed: a divisor of 27" in msg and "[1, 3, 9, 27]" in msg


def test_dynamic_group_size_must_divide_the_last_dimension() -> None:
    q = fq("activation", format="int8", granularity="per_group", group_size=4, dynamic=True)
    with pytest.raises(
        QuantConfigError, match=r"quant\.activation\.group_size: 4 does not divide the last dimension 6"
    ):
        q(torch.randn(2, 6))


def test_fake_quant_and_observer_flags() -> None:
    q = fq("activation", format="int4").train()
    q.enable_fake_quant(False)
    x = torch.randn(8) * 5
    assert q(x) is x  # float pass-through, but the observer still records (float warm-up)
    assert q.observer.initialized == 1 and q.fake_quant_enabled == 0 and not q.fake_quant_on
    q.enable_fake_quant(True).enable_observer(False)
    scale = q.scale.clone()
    q(x * 100)
    assert torch.equal(q.scale, scale) and q.observer_enabled == 0 and not q.observer_on


# ---------------------------------------------------------------- quantize(): what export stores
@pytest.mark.parametrize(
    "spec",
    [
        dict(format="int4", granularity="per_channel"),
        dict(format="uint8", symmetric=False),
        dict(format="int4", granularity="per_group", group_size=4, scale="lsq"),
        dict(format="int2", scale="lsq", symmetric=False),
    ],
)
def test_quantize_codes_dequantize_to_forward(spec: dict) -> None:
    w = torch.randn(4, 8)
    q = fq(shape=w.shape, **spec)
    y = q(w).detach()
    codes, s, z = q.quantize(w)
    assert codes.dtype == torch.int8
    if not q.spec.signed:  # the int8 container wraps uint8 codes (128..255): the exporter reinterprets them
        codes = codes.view(torch.uint8)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(((codes.float() - z) * s).reshape(w.shape), y)


# ---------------------------------------------------------------- state: buffers, state_dict, pickling
QUANT_CASES = {
    "int_static_weight": ("weight", (4, 8), dict(format="int4", granularity="per_channel")),
    "int_static_act_ema": ("activation", None, dict(format="uint8", symmetric=False, scale="ema")),
    "int_static_act_percentile": ("activation", None, dict(format="int8", scale="percentile")),
    "int_static_weight_mse": ("weight", (4, 8), dict(format="int4", scale="mse")),
    "int_dynamic_per_token": (
        "activation",
        None,
        dict(format="int8", granularity="per_token", dynamic=True, symmetric=False),
    ),
    "lsq_weight_per_group": (
        "weight",
        (4, 8),
        dict(format="int4", granularity="per_group", group_size=4, scale="lsq"),
    ),
    "lsq_plus_act": ("activation", None, dict(format="int4", scale="lsq", symmetric=False)),
    "pact_act": ("activation", None, dict(format="uint4", scale="pact")),
    "binary": ("weight", (4, 8), dict(format="binary", granularity="per_channel")),
    "binary_act": ("activation", None, dict(format="binary")),
    "ternary": ("weight", (4, 8), dict(format="ternary", granularity="per_channel")),
    "ternary_absmean": ("weight", (4, 8), dict(format="ternary", scale="absmean")),
    "ternary_ttq": ("weight", (4, 8), dict(format="ternary", scale="ttq")),
    "fp8_static": ("weight", (4, 8), dict(format="fp8_e4m3", granularity="per_channel")),
    "fp8_dynamic": ("activation", None, dict(format="fp8_e5m2", granularity="per_token", dynamic=True)),
    "fp8_lsq": ("weight", (4, 8), dict(format="fp8_e4m3", scale="lsq")),
}


def _case(name: str) -> tuple[FakeQuantizer, torch.Tensor]:
    role, shape, spec = QUANT_CASES[name]
    q = fq(role, shape=shape, **spec).train()
    return q, torch.randn(4, 8)


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_no_graph_breaks(name: str) -> None:
    """No ``.item()`` / host sync / data-dependent Python control flow in forward (first call included)."""
    q, x = _case(name)
    explains = []
    try:
        # The first call includes the one-time learned-scale initialisation; learned quantizers are traced
        # a second time to cover the steady state too.
        for _ in range(2 if q.learned else 1):
            torch._dynamo.reset()
            explains.append(torch._dynamo.explain(q)(x))
    finally:
        torch._dynamo.reset()
    for e in explains:
        assert e.graph_break_count == 0, e.break_reasons
        assert e.graph_count == 1


def test_state_lives_in_buffers() -> None:
    q = fq("activation", format="int8", scale="ema")
    assert set(dict(q.named_buffers())) == {
        "fake_quant_enabled",
        "observer_enabled",
        "initialized",
        "scale",
        "zero_point",
        "observer.min_val",
        "observer.max_val",
        "observer.initialized",
    }
    assert list(q.parameters()) == []
    lsq = fq(shape=(4, 8), format="int4", scale="lsq", symmetric=False)
    assert {n for n, _ in lsq.named_parameters()} == {"scale", "zero_point"}


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_state_dict_round_trip_restores_state_and_flags(name: str) -> None:
    a, x = _case(name)
    for _ in range(3):
        a(torch.randn_like(x) * 2)
    a.enable_observer(False).enable_fake_quant(False)
    sd = copy.deepcopy(a.state_dict())

    b, _ = _case(name)
    assert b.fake_quant_on and b.observer_on and not b.is_initialized
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert (b.fake_quant_on, b.observer_on, b.is_initialized) == (False, False, a.is_initialized)
    b.enable_fake_quant(True)
    a.enable_fake_quant(True)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))  # no re-initialisation after a load
    # And back: loading "enabled" flags turns the Python mirrors on again.
    c, _ = _case(name)
    b.load_state_dict(c.state_dict())
    assert b.fake_quant_on and b.observer_on and not b.is_initialized


def test_state_dict_round_trip_through_a_parent_module() -> None:
    parent = nn.ModuleDict({"q": fq("activation", format="int8")}).train()
    parent["q"](torch.randn(16) * 4)
    parent["q"].enable_observer(False)
    other = nn.ModuleDict({"q": fq("activation", format="int8")})
    other.load_state_dict(parent.state_dict())
    assert not other["q"].observer_on and torch.equal(other["q"].scale, parent["q"].scale)
    assert torch.equal(other["q"].observer.max_val, parent["q"].observer.max_val)


@pytest.mark.parametrize("name", ["int_static_act_ema", "lsq_weight_per_group", "ternary_ttq"])
def test_pickle_and_deepcopy(name: str) -> None:
    q, x = _case(name)
    q(x)
    for clone in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert torch.equal(clone.eval()(x), q.eval()(x))
        clone.load_state_dict(q.state_dict())  # the load hook survives the copy
        assert clone.is_initialized == q.is_initialized


def test_extra_repr() -> None:
    q = fq(shape=(4, 8), format="int4", granularity="per_group", group_size=4, scale="lsq")
    assert "weight: int4 per_group(4) lsq, stat_shape=(4, 2, 1)" in repr(q)


# ---------------------------------------------------------------- scale sources and the public surface
def test_every_scale_of_every_format_has_a_source() -> None:
    """The registry covers every ``(kind, scale)`` the config accepts, dynamic included, and nothing else;
    each quantizer runs the source its spec names, whose codes lie on the format's grid."""
    wanted = {(kind, scale) for kind, scales in SCALES_BY_KIND.items() for scale in scales}
    assert set(SOURCES) == wanted | {("int", "dynamic"), ("fp8", "dynamic")}
    fmt = {"int": "uint4", "binary": "binary", "ternary": "ternary", "fp8": "fp8_e4m3"}
    # Engines' rules need their own formats: llama.cpp's blocks (weights), signed dynamic activations.
    engine = {
        ("int", "gguf"): {"format": "int4", "granularity": "per_group", "group_size": 32},
        ("ternary", "gguf"): {"granularity": "per_group", "group_size": 256},
        ("int", "vllm"): {"format": "int8", "granularity": "per_token", "dynamic": True},
        ("int", "compressed_tensors"): {"format": "int8", "granularity": "per_token", "dynamic": True},
    }
    w = torch.randn(4, 256)
    for kind, scale in sorted(wanted):
        q = fq(shape=w.shape, **{"format": fmt[kind], "scale": scale, **engine.get((kind, scale), {})})
        assert type(q.source) is SOURCES[(kind, scale)] and source_key(q.spec) == (kind, scale)
        q(w)
        codes = q.codes(w)[0]
        if kind == "fp8":  # the largest magnitude maps onto the format's largest value
            assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float()) and codes.abs().max() == 448
        elif kind == "int":
            assert torch.equal(codes, codes.round()) and q.qmin <= codes.min() and codes.max() <= q.qmax
        else:
            assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}, (kind, scale)
    dyn = fq("activation", format="fp8_e5m2", dynamic=True)
    assert type(dyn.source) is SOURCES[("fp8", "dynamic")]


def test_public_flags_mirror_the_buffers() -> None:
    q = fq(shape=(4, 8), format="int4", scale="lsq")
    assert (q.fake_quant_on, q.observer_on, q.is_initialized) == (True, True, False)
    q(torch.randn(4, 8))
    q.enable_fake_quant(False).enable_observer(False)
    assert (q.fake_quant_on, q.observer_on, q.is_initialized) == (False, False, True)
    with torch.no_grad():  # set behind the quantizer's back (as a broadcast does): sync_flags reads them
        q.fake_quant_enabled.fill_(1)
        q.initialized.fill_(0)
    q.sync_flags()
    assert (q.fake_quant_on, q.observer_on, q.is_initialized) == (True, False, False)
    with pytest.raises(AttributeError):
        q.fake_quant_on = False  # read-only


@pytest.mark.parametrize(
    ("role", "spec"),
    [
        ("activation", dict(format="uint8", symmetric=False)),
        ("weight", dict(format="int4", granularity="per_channel", scale="ema")),
        ("activation", dict(format="int4", scale="lsq", symmetric=False)),
        ("weight", dict(format="int4", granularity="per_group", group_size=4, scale="lsq")),
        ("activation", dict(format="fp8_e4m3")),
        ("weight", dict(format="ternary", scale="ttq")),
    ],
)
def test_effective_qparams_are_what_the_forward_uses(role: str, spec: dict) -> None:
    """``effective_qparams()``: the stored (scale, zero point, negative scale), compact, as the forward uses
    them (up to LSQ's gradient-scale rounding, which ``learned_scale(x, p)`` reproduces exactly)."""
    q = fq(role, shape=(4, 8), **spec).train()
    x = torch.randn(4, 8) * 3
    q(x)
    if q.learned:
        with torch.no_grad():
            q.scale.mul_(-1.0)  # the sign of a learned scale does not matter
    s, z, sn = q.effective_qparams()
    s_fwd, z_fwd = q.qparams(x)
    assert s.shape == q.stat_shape and not s.requires_grad
    assert torch.allclose(s, s_fwd.reshape(q.stat_shape), rtol=1e-6, atol=0) and torch.all(s > 0)
    if q.learned:
        assert torch.equal(q.learned_scale(x, q.scale).reshape(s_fwd.shape), s_fwd)
    if z is not None:
        assert torch.equal(z, z_fwd.reshape(q.stat_shape)) and torch.equal(z, z.round())
    assert (sn is None) == (q.scale_neg is None)
    if sn is not None:
        assert torch.equal(sn, q.scale_neg.detach().abs())


def test_effective_qparams_are_none_for_scales_computed_per_tensor() -> None:
    for q in (fq("activation", format="int8", dynamic=True), fq(shape=(4, 8), format="ternary")):
        assert q.effective_qparams() == (None, None, None)


def test_view_and_granularity() -> None:
    q = fq(shape=(4, 8), format="int4", granularity="per_group", group_size=4)
    x = torch.randn(4, 8)
    assert q.view(x).shape == (4, 2, 4) and q.granularity.rows(x).shape == (8, 4)
    assert q.granularity.stat_shape(x.shape) == q.stat_shape == (4, 2, 1)
    act = fq("activation", shape=(3,), act_axis=1, format="int8", granularity="per_channel")
    xa = torch.randn(2, 3, 5)
    assert act.view(xa) is xa and act.granularity.bcast(act.scale, xa).shape == (1, 3, 1)
