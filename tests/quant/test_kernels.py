"""The fused CPU kernels (``qat.quant.kernels``) against the PyTorch ops they replace: the same values,
masks, codes and gradients bit for bit, on round-half ties, clipped, infinite and NaN values and signed
zeros, for every scale layout they cover; the layouts they do not cover fall back to the same ops; and a
QAT training step of a quantized layer gives the same bits with the kernels on and off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.quantizers import randn
from torch import nn

from qat.config import QuantSpec
from qat.quant import kernels, observers, ste
from qat.quant import modules as qm

SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values (NaN where NaN; bit for bit elsewhere)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def test_the_kernels_build_on_this_machine() -> None:
    """CI has a compiler: the kernels must be there (else every other test here compares the fallback
    with itself)."""
    assert kernels.load() is not None


def _input(shape: tuple[int, ...], s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Values on the grid, exactly half-way between two codes (ties), beyond the range, and specials."""
    x = randn(0, *shape) * 4 * s
    flat = x.view(-1)
    ties = (torch.arange(flat.numel() // 3) % 9 - 4 + 0.5).float()
    s_flat = s.expand(shape).reshape(-1)
    flat[: ties.numel()] = (ties - z.expand(shape).reshape(-1)[: ties.numel()]) * s_flat[: ties.numel()]
    flat[-len(SPECIALS) :] = torch.tensor(SPECIALS)
    return x


# (x shape, scale shape): the layouts of the quantizers (per-token, per-group, per-channel weight of a
# conv and a linear, per-tensor).
LAYOUTS = {
    "per_token": ((3, 5, 16), (3, 5, 1)),
    "per_group_weight": ((6, 4, 8), (6, 4, 1)),
    "per_channel_conv": ((6, 4, 3, 3), (6, 1, 1, 1)),
    "per_channel_linear": ((12, 16), (12, 1)),
    "per_tensor": ((2, 4, 5, 6), (1,)),
}
GRIDS = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("zero", ["per_row", "scalar", "none"])
@pytest.mark.parametrize("keep_codes", [True, False])
def test_affine_parts_equals_the_torch_ops(layout, grid, zero, keep_codes) -> None:
    shape, sshape = LAYOUTS[layout]
    qmin, qmax = GRIDS[grid]
    s = torch.rand(sshape, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.01
    z = {"per_row": torch.round(torch.rand(sshape) * 6 - 3), "scalar": torch.tensor([2.0]),
         "none": torch.zeros(sshape)}[zero]  # fmt: skip
    x = _input(shape, s, z)
    assert kernels.affine_rows(x, s, z, qmin, qmax, None) is not None  # covered: the kernel runs
    fused = ste.affine_parts(x, s, z, qmin, qmax, keep_codes)
    with kernels.disabled():
        ref = ste.affine_parts(x, s, z, qmin, qmax, keep_codes)
    finite = torch.isfinite(x)
    assert same(fused[0], ref[0]) and torch.equal(fused[1], ref[1])
    assert (fused[2] is None) == (ref[2] is None) == (not keep_codes)
    if keep_codes:  # the code of a NaN is not defined (nor used: the value is NaN)
        assert fused[2].dtype == ref[2].dtype and torch.equal(fused[2][finite], ref[2][finite])
        assert same(ste.affine_dequant(fused[2], s, z, torch.float32), _dequant_ref(ref[2], s, z))


def _dequant_ref(codes, s, z):
    with kernels.disabled():
        return ste.affine_dequant(codes, s, z, torch.float32)


def test_ties_round_to_even_and_specials_are_kept() -> None:
    """The cases a plausible kernel gets wrong: half to even (not away from zero), NaN and inf give NaN
    (the ``+ 0 * x`` of the straight-through sum), a NaN or a clipped value is masked."""
    s, z = torch.ones(1), torch.zeros(1)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 200.0, float("inf"), float("nan")]])
    y, mask, codes = kernels.affine_rows(x, s, z, -128, 127, torch.int8)
    assert y[0, :6].tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0]
    assert torch.isnan(y[0, 6:]).all()
    assert mask[0].tolist() == [False] * 5 + [True] * 3
    assert codes[0, :6].tolist() == [0, 2, 2, 0, -2, 127]


@pytest.mark.parametrize("case", ["non_contiguous", "per_channel_activation", "bf16", "float64"])
def test_layouts_not_covered_fall_back_to_the_same_ops(case) -> None:
    x, s, z = randn(2, 4, 6, 5) * 3, torch.full((1,), 0.05), torch.zeros(1)
    if case == "non_contiguous":
        x = x.transpose(1, 2)
    elif case == "per_channel_activation":  # one scale per index of dim 1: not one per leading index
        s, z = torch.rand(1, 4, 1, 1) * 0.1 + 0.01, torch.zeros(1, 4, 1, 1)
    else:
        x = x.to({"bf16": torch.bfloat16, "float64": torch.float64}[case])
    assert kernels.affine_rows(x, s, z, -128, 127, torch.int8) is None
    fused = ste.affine_parts(x, s, z, -128, 127, True)
    with kernels.disabled():
        ref = ste.affine_parts(x, s, z, -128, 127, True)
    assert all(same(a, b) for a, b in zip(fused, ref, strict=True))


def test_autograd_sees_the_torch_ops_when_it_records() -> None:
    """A tensor autograd records through (e.g. a backward pass with ``create_graph=True``) never goes to a
    kernel, whose outputs have no gradient."""
    g = randn(0, 4, 8).requires_grad_()
    mask = randn(1, 4, 8) > 0.5
    assert kernels.stopped(mask, g) is None
    out = ste._stopped(mask, g)
    assert out.requires_grad
    with torch.no_grad():
        assert kernels.stopped(mask, g) is not None


def test_stopped_gradient_equals_where() -> None:
    g = randn(3, 7, 33)
    g.view(-1)[:4] = torch.tensor([-0.0, 0.0, float("nan"), -float("inf")])
    mask = randn(4, 7, 33) > 0.8
    mask.view(-1)[:4] = torch.tensor([True, False, True, False])
    assert kernels.stopped(mask, g) is not None
    with kernels.disabled():
        ref = ste._stopped(mask, g)
    assert same(ste._stopped(mask, g), ref)  # a masked -0 or NaN is +0, as torch.where writes


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 100])
def test_finite_range_equals_the_torch_ops(cols) -> None:
    rows = randn(5, 6, cols) * 3
    rows[1, 0] = float("nan")
    rows[2] = float("inf")  # a row of infinities: counted as 0
    rows[3, -1] = -float("inf")
    rows[4] = -rows[4].abs() - 1  # all negative: the max is the largest negative value
    assert kernels.finite_range(rows) is not None
    lo, hi = observers.finite_range(rows)
    with kernels.disabled():
        lo_ref, hi_ref = observers.finite_range(rows)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)


# A quantized layer's training step with the kernels and without: every gradient, bit for bit.
SCHEMES = {
    "w4g_lsq+a8_dyn": (QuantSpec(format="int4", granularity="per_group", group_size=8, scale="lsq"),
                       QuantSpec(format="int8", granularity="per_token", dynamic=True, symmetric=False)),
    "w4c_lsq+a4_lsq+": (QuantSpec(format="int4", granularity="per_channel", scale="lsq"),
                        QuantSpec(format="int4", scale="lsq", symmetric=False)),
    "w8c_minmax+a8_static": (QuantSpec(format="int8", granularity="per_channel"),
                             QuantSpec(format="uint8", symmetric=False)),
}  # fmt: skip


def _step(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(randn(2, *y.shape))
    return [y.detach(), xg.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_training_step_is_the_same_with_and_without_the_kernels(scheme, kind) -> None:
    wspec, aspec = SCHEMES[scheme]
    if kind == "linear":
        layer, x = qm.QuantLinear.from_float(nn.Linear(16, 12), wspec, aspec, "l"), randn(1, 3, 5, 16) * 2
    else:
        if aspec.granularity == "per_token":
            aspec = QuantSpec(format="int8", dynamic=True, symmetric=False)
        if wspec.granularity == "per_group":
            wspec = QuantSpec(format="int4", granularity="per_group", group_size=4, scale="lsq")
        layer = qm.QuantConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), wspec, aspec, "c")
        x = randn(1, 2, 4, 5, 6) * 2
    layer.train()
    layer(x)  # learned scales get their first value, observers their range
    with kernels.disabled():
        ref = _step(layer, x)
    fused = _step(layer, x)
    assert len(fused) >= 4
    assert all(same(a, b) for a, b in zip(fused, ref, strict=True))


def test_the_build_finds_ninja_without_one_on_path(monkeypatch) -> None:
    import ninja

    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    kernels._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_qat_kernels_0_turns_them_off() -> None:
    code = "from qat.quant import kernels, ste; assert kernels.load() is None; print('off')"
    env = {**os.environ, "QAT_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "off"


def test_each_source_builds_in_its_own_directory(tmp_path, monkeypatch) -> None:
    """A changed source (another checkout, a mutant) gets another build name, so it never imports the
    library of a different source."""
    name = kernels.build_name()
    changed = tmp_path / "kernels.cpp"
    changed.write_bytes(kernels.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(kernels, "SOURCE", changed)
    assert kernels.build_name() != name
    monkeypatch.setattr(kernels, "CFLAGS", [*kernels.CFLAGS, "-DX"])
    assert len({name, kernels.build_name()}) == 2
