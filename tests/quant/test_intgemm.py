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
    a, a0, _ = intgemm.act_codes(x, sx, zx, -128, 127, symmetric=False)
    y = intgemm.int_gemm(a, a0.reshape(1), sx, w, None)
    qa = torch.clamp(torch.round(x / sx) + zx, -128, 127)
    exact = ((qa - zx).double() @ (q - zp[:, None]).double().T) * (sx.double() * sw.double())
    assert torch.allclose(y.double(), exact, rtol=1e-6)
