"""The fused fake-quant Functions (``qat.quant.ste``) against the straight-through expressions they replace
(``tests/helpers/unfused.py``): the same output and the same gradients for x, the scale and the zero
point, bit for bit, on random inputs with clipped values, ties and LSQ+ offsets; and what they keep for
the backward pass (a mask, and codes + input only when a scale is learned)."""

from __future__ import annotations

import pytest
import torch
from helpers import unfused
from helpers.probes import saved_by_autograd
from helpers.quantizers import fq, grad, randn

from qat.quant import ste

# Shapes of a fake quant's input (the quantizer's view) and of its broadcast scale.
LAYOUTS = {
    "per_tensor": ((6, 10), (1,)),
    "per_channel": ((6, 10), (6, 1)),
    "per_group": ((6, 3, 8), (6, 3, 1)),
    "per_token": ((2, 5, 12), (2, 5, 1)),
    "scalar": ((40,), ()),
}
GRIDS = {"int4": (-8, 7), "uint8": (0, 255), "int2": (-2, 1), "int8": (-128, 127)}
LEARN = ("none", "scale", "scale+offset")


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns (so -0 differs from +0 and NaNs compare)."""
    return t.detach().contiguous().view(torch.int32)


def same(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bit for bit, but for the sign of the x gradient's zeros: the fused backward passes the gradient as
    ``where(mask, g, 0)`` (+0 where clipped), the expression as ``g * mask`` (-0 for a negative g), five
    times slower on CPU (a bool -> float conversion); a zero either way."""
    if a is None or b is None:
        return a is None and b is None
    if name == "x":
        return torch.equal(a, b) and torch.equal(bits(a)[b != 0], bits(b)[b != 0])
    return torch.equal(bits(a), bits(b))


def _inputs(seed: int, layout: str, grid: str, learn: str):
    shape, sshape = LAYOUTS[layout]
    qmin, qmax = GRIDS[grid]
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(sshape, generator=gen) * 0.3 + 0.05
    z = torch.zeros(sshape)
    if learn == "scale+offset" or grid == "uint8":
        z = torch.randint(qmin, qmax + 1, sshape, generator=gen).float()
    # Codes spread over the grid and half its width beyond either end (clipped), a fifth of them ties.
    u = qmin + (qmax - qmin) * (2 * torch.rand(shape, generator=gen) - 0.5)
    u.view(-1)[::5] = u.view(-1)[::5].floor() + 0.5
    x = (u - z) * s
    return x, s, z, qmin, qmax


def _run(fn, x, s, z, *args, x_grad, learn):
    x, s, z = (t.clone() for t in (x, s, z))
    x.requires_grad_(x_grad)
    s.requires_grad_(learn != "none")
    z.requires_grad_(learn == "scale+offset")
    y = fn(x, s, z, *args)
    g = randn(7, *y.shape)
    if y.requires_grad:
        y.backward(g)
    return y, x.grad, s.grad, z.grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("learn", LEARN)
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_affine_equals_the_straight_through_expression(layout, grid, learn, x_grad) -> None:
    x, s, z, qmin, qmax = _inputs(len(layout) * 31 + len(grid), layout, grid, learn)
    fused = _run(ste.fake_quant_affine, x, s, z, qmin, qmax, x_grad=x_grad, learn=learn)
    ref = _run(unfused.fake_quant_affine, x, s, z, qmin, qmax, x_grad=x_grad, learn=learn)
    q_raw = torch.round(x / s) + z
    assert (q_raw < qmin).any() and (q_raw > qmax).any()  # clipping is exercised
    for name, a, b in zip(("value", "x", "scale", "zero_point"), fused, ref, strict=True):
        assert same(name, a, b), name


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("layout", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("learn", ["none", "scale"])
def test_fused_fp8_equals_the_straight_through_expression(fmt, layout, learn) -> None:
    shape, sshape = LAYOUTS[layout]
    s = torch.rand(sshape, generator=torch.Generator().manual_seed(3)) + 0.5
    x = randn(4, *shape) * ste.FP8_MAX[fmt] * 0.6  # some beyond the largest value (saturated)
    x.view(-1)[::7] *= 1e-6  # and some subnormal

    def run(fn):
        return _run(lambda a, b, c: fn(a, b, fmt), x, s, torch.zeros(()), x_grad=True, learn=learn)

    fused, ref = run(ste.fake_quant_fp8), run(unfused.fake_quant_fp8)
    assert (ref[1] == 0).any() and (ref[1] != 0).any()  # saturated and passing values
    for name, a, b in zip(("value", "x", "scale"), fused[:3], ref[:3], strict=True):
        assert same(name, a, b), name


def test_fused_affine_keeps_a_mask_and_codes_not_float_copies() -> None:
    """What the backward pass keeps alive: the fixed-scale grid a bool mask; a learned scale also the int8
    codes and the input itself (no float tensor of x's size is made for the backward pass)."""
    x = randn(0, 64, 32).requires_grad_()
    s, z = torch.full((64, 1), 0.1), torch.zeros(64, 1)
    fixed = saved_by_autograd(lambda: ste.fake_quant_affine(x, s, z, -8, 7))
    assert [(t.dtype, t.shape) for t in fixed] == [(torch.bool, x.shape)]
    sl = s.clone().requires_grad_()
    learned = saved_by_autograd(lambda: ste.fake_quant_affine(x, sl, z, -8, 7))
    big = [t for t in learned if t.numel() == x.numel()]
    assert sorted(str(t.dtype) for t in big) == ["torch.bool", "torch.float32", "torch.int8"]
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # the float one is x, not a copy


@pytest.mark.parametrize(
    ("role", "spec"),
    [
        ("weight", dict(format="int4", scale="lsq", granularity="per_group", group_size=8)),
        ("weight", dict(format="int3", scale="lsq", granularity="per_channel")),
        ("activation", dict(format="int4", scale="lsq", symmetric=False)),  # LSQ+
        ("activation", dict(format="uint4", scale="lsq")),
        ("activation", dict(format="int8", granularity="per_token", symmetric=False, dynamic=True)),
        ("weight", dict(format="fp8_e4m3", scale="lsq", granularity="per_channel")),
    ],
)
def test_quantizer_gradients_are_those_of_the_unfused_expression(role, spec, monkeypatch) -> None:
    """Through a whole FakeQuantizer (LSQ's gradient scale, the clamped positive scale, LSQ+'s rounded
    offset): every parameter's gradient is bit for bit the one of the straight-through expression."""
    x = randn(0, 6, 16) * 2
    q = fq(role, shape=x.shape if role == "weight" else None, **spec).train()
    q(x)  # initialise learned scales
    results = []
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(ste, "fake_quant_affine", unfused.fake_quant_affine)
            monkeypatch.setattr(ste, "fake_quant_fp8", unfused.fake_quant_fp8)
        q.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = q(xg)
        y.backward(randn(1, *y.shape))
        results.append([("value", y), ("x", xg.grad), *((n, p.grad) for n, p in q.named_parameters())])
    for (name, a), (_, b) in zip(*results, strict=True):
        assert same(name, a, b), name


@pytest.mark.parametrize("grid", ["int4", "fp8_e4m3"])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_functions_clip_where_eager_does(grid, backend) -> None:
    """Traced by ``torch.compile`` the mask is built another way (bytes, for inductor's CPU kernels): the
    same values are clipped, including values just past the range, inf and NaN."""
    s = torch.tensor([0.5])
    if grid == "int4":
        fn, edge = (lambda x: ste.fake_quant_affine(x, s, torch.zeros(1), -8, 7)), 3.75
    else:
        fn, edge = (lambda x: ste.fake_quant_fp8(x, s, grid)), ste.FP8_MAX[grid] * 0.5
    base = randn(0, 64) * edge
    x = torch.cat(
        [base, torch.tensor([edge * (1 + 1e-6), -edge * (1 + 1e-6), edge, float("inf"), float("nan")])]
    )
    (y, gx), (yc, gxc) = (
        grad(f, x, torch.ones_like(x)) for f in (fn, torch.compile(fn, fullgraph=True, backend=backend))
    )
    torch._dynamo.reset()
    assert torch.equal(gx, gxc) and (gx == 0).sum() >= 4
    assert torch.equal(y.nan_to_num(), yc.nan_to_num())
