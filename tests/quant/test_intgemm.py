"""The integer eval path: quantized layers in eval mode without autograd compute integer GEMMs.

The float fake-quant forward and the integer GEMM compute the same real number; they differ only by float32
summation order. With a single layer (no rounding cascade) that is a relative error of ~1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.quant import intgemm
from qat.quant.modules import int_gemm_eval

W8 = {"format": "int8", "granularity": "per_channel"}
A8_ASYM = {"format": "int8", "symmetric": False, "scale": "ema"}
FORMATS = {
    "w8a8_sym": {"weight": W8, "activation": {"format": "int8"}},
    "w8a8_asym": {"weight": W8, "activation": A8_ASYM},
    "w4a4_lsqplus": {
        "weight": {"format": "int4", "granularity": "per_channel", "scale": "lsq"},
        "activation": {"format": "int4", "symmetric": False, "scale": "lsq"},
    },
    "wu8au8": {
        "weight": {"format": "uint8", "granularity": "per_channel", "symmetric": False},
        "activation": {"format": "uint8", "symmetric": False},
    },
    "w4_pertensor_a8dyn_token": {
        "weight": {"format": "int4", "granularity": "per_tensor"},
        "activation": {"format": "int8", "granularity": "per_token", "dynamic": True, "symmetric": False},
    },
    "binary_a8": {"weight": {"format": "binary", "granularity": "per_channel"}, "activation": A8_ASYM},
    "ternary_a8": {"weight": {"format": "ternary", "scale": "absmean"}, "activation": A8_ASYM},
    "pact_a4": {"weight": W8, "activation": {"format": "uint4", "scale": "pact"}},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.c1 = nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(x))  # [B, 8, 4, 4]
        y = torch.relu(self.c1(y.flatten(2)))  # [B, 8, 16]
        return self.fc(y.flatten(1))


def _prepared(fmt: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = qat.prepare(Net(), FORMATS[fmt])
    x = torch.randn(16, 3, 8, 8)
    qat.calibrate(model, [(x,)], num_batches=1)
    return model.eval(), x


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_eval_layers_take_the_integer_path_and_match_the_float_forward(fmt: str) -> None:
    model, x = _prepared(fmt)
    with torch.no_grad():
        assert all(int_gemm_eval(m, m.weight) for m in (model.c2, model.c1, model.fc))
        # Layer by layer (no cascade), each on its own float input.
        h2 = torch.randn(16, 3, 8, 8)
        h1 = torch.randn(16, 8, 16).relu()
        hf = torch.randn(16, 128).relu()
        for layer, h in ((model.c2, h2), (model.c1, h1), (model.fc, hf)):
            got = layer(h)
            with torch.enable_grad():
                ref = layer(h).detach()
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), fmt


def test_training_mode_and_autograd_take_the_float_path() -> None:
    model, x = _prepared("w8a8_asym")
    fc = model.fc
    with torch.no_grad():
        assert int_gemm_eval(fc, fc.weight)
        model.train()
        assert not int_gemm_eval(fc, fc.weight)
    model.eval()
    assert not int_gemm_eval(fc, fc.weight)  # grad enabled
    y = model(x)
    y.sum().backward()  # the float path has gradients
    assert fc.weight.grad is not None


def test_formats_without_integer_gemm_keep_the_float_path() -> None:
    for cfg in (
        {"weight": {"format": "int4", "granularity": "per_group", "group_size": 8}, "activation": A8_ASYM},
        {"weight": W8, "activation": {"format": "int8", "granularity": "per_channel"}},
        {"weight": {"format": "fp8_e4m3"}, "activation": {"format": "fp8_e4m3"}},
        {"weight": W8, "activation": None},
    ):
        torch.manual_seed(0)
        model = qat.prepare(nn.Sequential(nn.Linear(32, 8)), cfg).eval()
        qat.calibrate(model, [(torch.randn(4, 32),)], num_batches=1)
        model.eval()
        with torch.no_grad():
            assert not int_gemm_eval(model[0], model[0].weight), cfg


def test_int_gemm_matches_integer_reference() -> None:
    """``int_gemm`` = (A + a0) @ (Q - zp).T exactly in integers, then scales and bias."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (6, 40), generator=g).float()  # uint8 weight codes
    zp = torch.randint(100, 150, (6,), generator=g).float()
    sw = torch.rand(6, generator=g) + 0.5
    w = intgemm.int_weight(q, sw, zp, qmax=255)
    x = torch.randn(5, 40, generator=g)
    sx, zx = torch.tensor([0.02]), torch.tensor([7.0])
    c = intgemm.act_quant(sx, zx, -128, 127, False, w)
    y = intgemm.int_gemm(intgemm.act_codes(x, c), c, w, None)
    qa = torch.clamp(torch.round(x / sx) + zx, -128, 127)
    exact = ((qa - zx).double() @ (q - zp[:, None]).double().T) * (sx.double() * sw.double())
    assert torch.allclose(y.double(), exact, rtol=1e-6)


def test_the_weight_is_stored_one_row_per_output_for_a_column_major_gemm() -> None:
    codes = torch.randint(-127, 128, (6, 40)).float()
    w = intgemm.int_weight(codes, torch.rand(6), None, qmax=127)
    assert w.w_int.shape == (6, 40) and w.w_int.is_contiguous() and w.w_int.dtype == torch.int8
    assert w.w_int.t().stride() == (1, 40)  # what _int_mm reads: [K, N], column-major
    assert torch.equal(w.w_sum, codes.sum(dim=1).int()) and w.w_zero is None


def _vnni_cpu() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return probe is not None and bool(probe()) and torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("rows", [1, 3, 127, 128, 200])
@pytest.mark.parametrize("asym", [False, True])
def test_onednn_kernel_gives_the_bits_of_the_int_mm_path(rows: int, asym: bool) -> None:
    """Both kernels compute ``float(acc) * (sx * w_scale) + bias`` with two roundings: the runtime and the
    eval path may take either (by batch size) and still agree bit for bit, at every batch size."""
    if not intgemm.onednn_exact():
        assert not _vnni_cpu(), "oneDNN's int8 matmul should be exact on a CPU with VNNI"
        pytest.skip("this CPU's oneDNN int8 matmul is not exact (no VNNI / AMX): the _int_mm path only")
    g = torch.Generator().manual_seed(rows)
    for k, n, per_tensor in ((27, 10, False), (768, 96, True), (200, 3, False)):
        codes = torch.randint(-127, 128, (n, k), generator=g)
        w = intgemm.int_weight(codes, torch.rand(1 if per_tensor else n, generator=g) + 0.1, None, 127)
        packed = intgemm.pack(w)
        assert packed.packed is not None
        x = torch.randn(rows, k, generator=g) * 3
        sx = torch.tensor([0.0213])
        c = intgemm.act_quant(sx, torch.tensor([7.0 if asym else 0.0]), -128, 127, not asym, w)
        a = intgemm.act_codes(x, c)
        for bias in (None, torch.randn(n, generator=g)):
            ref = intgemm.int_gemm(a, c, w, bias)  # unpacked: _int_mm
            assert torch.equal(intgemm._onednn_gemm(a, c, packed, bias), ref)
            assert torch.equal(intgemm.int_gemm(a, c, packed, bias), ref)
            exact = (a.double() + (0 if c.a0 is None else c.a0.double())) @ codes.double().T
            scale = sx * w.w_scale
            assert torch.equal(ref, exact.float() * scale if bias is None else exact.float() * scale + bias)


def test_per_token_scales_and_weight_offsets_keep_the_int_mm_path() -> None:
    """oneDNN takes one activation scale and symmetric weights; the rest is _int_mm, still exact."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (5, 32), generator=g).float()
    w = intgemm.pack(intgemm.int_weight(q, torch.rand(5, generator=g), torch.full((5,), 120.0), qmax=255))
    assert w.packed is None  # uint8 codes with an offset
    x = torch.randn(130, 32, generator=g)
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    c = intgemm.act_quant(sx, torch.zeros_like(sx), -127, 127, True, w)
    a = intgemm.act_codes(x, c)
    y = intgemm.int_gemm(a, c, w, None)
    exact = (a.double() @ (q - 120.0).double().T) * sx.double() * w.w_scale.double()
    assert torch.allclose(y.double(), exact, rtol=1e-6)
