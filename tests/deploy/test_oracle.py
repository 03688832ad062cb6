"""Every format the exporter writes, checked against an independent reference (``helpers.oracle``).

The other export tests compare the integer runtime with the eval-mode fake-quant model, and both compute
with ``qat.quant.intgemm``: a shared bug passes them. Here the oracle (numpy, written from the format
definition, sharing no code with ``qat``) computes every quantized layer from the exported files, and the
runtime must match it to float32 rounding (``helpers.oracle_check``). Tiny models keep this fast.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.export_models import quant_cfg
from helpers.oracle import Export, fp8_decode, round_to_fp8, unpack_codes
from helpers.oracle_check import assert_matches_oracle, compare
from torch import nn

import qat
from qat.models import TinyGPT


class TinyCNN(nn.Module):
    """Every convolution the format has: conv2d + BatchNorm (foldable), a strided dilated conv2d, a
    conv1d, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2)
        self.conv3 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4, 6, 6] -> [B, 10]
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv3(self.conv2(x).flatten(2))  # [B, 8, 3, 3] -> [B, 8, 9]
        return self.fc(F.gelu(x).mean(-1))


def tiny_gpt() -> TinyGPT:
    return TinyGPT(vocab_size=64, seq_len=8, d_model=16, n_layers=1, n_heads=2)


def _batches(kind: str, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return [(torch.randn(8, 4, 6, 6, generator=g), torch.zeros(8)) for _ in range(n)]
    ids = [torch.randint(0, 64, (4, 8), generator=g) for _ in range(n)]
    return [(t, t) for t in ids]


def w(fmt: str, **kw: Any) -> dict[str, Any]:
    return {"format": fmt, **kw}


INT8_EMA = w("int8", symmetric=False, scale="ema")
DYN_TOKEN = w("int8", granularity="per_token", dynamic=True)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # int weights x static int activations: the integer GEMM (packed 4/2-bit, 3 bits in 4-bit containers)
    "w8a8": ("cnn", quant_cfg("w8a8")),
    "w4a4_lsqplus": ("cnn", quant_cfg("w4a4")),
    "w2a2": ("cnn", quant_cfg("w2a2")),
    "w3a4": ("cnn", quant_cfg("w3a4")),
    "w4a4_pact_uint": ("cnn", quant_cfg("w4a4_pact")),
    "w8_tensor_a8_sym": ("cnn", {"weight": w("int8", scale="minmax"),
                                 "activation": w("int8", scale="minmax")}),
    "wu8au8_asym": ("cnn", {"weight": w("uint8", granularity="per_channel", symmetric=False, scale="minmax"),
                            "activation": w("uint8", symmetric=False, scale="minmax")}),
    "w4asym_a8": ("cnn", {"weight": w("int4", granularity="per_channel", symmetric=False, scale="minmax"),
                          "activation": INT8_EMA}),
    "wu4asym_a8": ("cnn", {"weight": w("uint4", granularity="per_channel", symmetric=False, scale="minmax"),
                           "activation": INT8_EMA}),
    "w8a8_dyn_tensor_asym": ("cnn", {"weight": w("int8", granularity="per_channel"),
                                     "activation": w("int8", dynamic=True, symmetric=False)}),
    "w5a6_dyn_tensor_sym": ("cnn", {"weight": w("int5", granularity="per_channel"),
                                    "activation": w("int6", dynamic=True)}),
    # dequantized paths: weight-only, per-group weights, per-channel activations, fp8, TTQ
    "w6_weight_only": ("cnn", {"weight": w("int6", granularity="per_channel"), "activation": None}),
    "w4g4_a8": ("cnn", {"weight": w("int4", granularity="per_group", group_size=4), "activation": INT8_EMA}),
    "w4_a8_channel": ("cnn", {"weight": w("int4"), "activation": w("int8", granularity="per_channel")}),
    "binary": ("cnn", quant_cfg("binary")),
    "xnor_binary_acts": ("cnn", quant_cfg("xnor")),
    "ternary_twn": ("cnn", quant_cfg("ternary_twn")),
    "ternary_ttq": ("cnn", quant_cfg("ternary_ttq")),
    "a8_float_weight": ("cnn", {"weight": None, "activation": INT8_EMA}),
    "w8_axis1_a8": ("cnn", {"weight": w("int8", granularity="per_channel", axis=1), "activation": INT8_EMA}),
    "w8_binary_acts_lsq": ("cnn", {"weight": w("int8", granularity="per_channel"),
                                   "activation": w("binary", scale="lsq")}),
    "fp8_e4m3_lsq": ("cnn", {"weight": w("fp8_e4m3", granularity="per_channel", scale="lsq"),
                             "activation": w("fp8_e4m3", scale="lsq")}),
    "fp8_e4m3": ("cnn", quant_cfg("fp8_e4m3")),
    "fp8_e5m2": ("cnn", quant_cfg("fp8_e5m2")),
    "fold_bn_w4a4": ("cnn", {**quant_cfg("w4a4"), "fold_bn": True}),
    # transformer: embeddings, per-token / per-group dynamic activations, attention quantizers, smoothing
    "gpt_w8a8_attention": ("gpt", {**quant_cfg("w8a8"), "attention": w("int8")}),
    "gpt_w8a8_dyn_token": ("gpt", quant_cfg("w8a8dyn")),
    "gpt_w4g8a8_dyn_token": ("gpt", {"weight": w("int4", granularity="per_group", group_size=8),
                                     "activation": DYN_TOKEN, "attention": w("int8", dynamic=True,
                                                                             granularity="per_token")}),
    "gpt_w2g8a2_dyn_token": ("gpt", {**quant_cfg("w2g32a2dyn"),
                                     "overrides": {"*": {"weight": {"group_size": 8}}}}),
    "gpt_w8a4_dyn_group": ("gpt", {"weight": w("int8", granularity="per_channel"),
                                   "activation": w("int4", granularity="per_group", group_size=8,
                                                   dynamic=True)}),
    "gpt_bitnet": ("gpt", quant_cfg("bitnet")),
    "gpt_binary_a8dyn": ("gpt", quant_cfg("binary_a8dyn")),
    "gpt_fp8_e4m3_dyn": ("gpt", quant_cfg("fp8_e4m3_dyn")),
    "gpt_smooth_w8a8": ("gpt", {"weight": w("int8", granularity="per_channel", scale="minmax"),
                                "activation": w("int8", symmetric=False, scale="lsq"),
                                "exclude": ["*_emb"], "smooth": 0.8}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_runtime_matches_the_oracle(name, tmp_path):
    kind, cfg = CASES[name]
    make = TinyCNN if kind == "cnn" else tiny_gpt
    torch.manual_seed(0)
    model = qat.prepare(make(), copy.deepcopy(cfg))
    qat.calibrate(model, _batches(kind, 2, seed=1))
    model.eval()
    qat.export(model, tmp_path / "e")
    inputs = [x for x, _ in _batches(kind, 1, seed=2)]
    figures = assert_matches_oracle(tmp_path / "e", make, inputs, fake_quant=model)
    assert figures["runtime_layers"]  # every quantized layer was compared
    if name == "fold_bn_w4a4":
        assert Export(tmp_path / "e").folded_bn() == {"conv1": "bn1"}
    # The dequantisation path of the runtime, held to the float-sum bound.
    exact = qat.load_quantized(tmp_path / "e", make(), int_matmul=False)
    assert_matches_oracle(tmp_path / "e", make, inputs, runtime=exact, int_gemm=False)


TIE_FORMATS = {
    "int8": INT8_EMA,  # ties at n + 0.5 go to the even code, not away from zero
    "fp8_e4m3": w("fp8_e4m3", scale="ema"),  # ties between two float8 values go to the even mantissa
    "fp8_e5m2": w("fp8_e5m2", scale="ema"),
}


@pytest.mark.parametrize("fmt", list(TIE_FORMATS))
def test_activation_ties_round_to_even(fmt, tmp_path):
    """Inputs exactly half-way between two representable values (``x * (1/s)`` in float32) must round to
    the even one: random data almost never hits a tie, so a rounding-mode bug needs these."""
    torch.manual_seed(0)
    model = qat.prepare(
        TinyCNN(), {"weight": w("int8", granularity="per_channel"), "activation": TIE_FORMATS[fmt]}
    )
    qat.calibrate(model, _batches("cnn", 2, seed=1))
    qat.export(model.eval(), tmp_path / "e")
    ref = Export(tmp_path / "e")
    s = np.float32(ref.tensors[ref.layers["fc"]["input"]["scale"]["tensor"]].item())
    if fmt == "int8":
        mids = np.arange(-40, 40) + 0.5
    else:
        grid = fp8_decode(np.arange(0x7F), fmt[4:])
        grid = grid[np.isfinite(grid)]
        mids = (grid[1:] + grid[:-1]) / 2
        mids = np.concatenate([mids, -mids])
    near = (mids * s).astype(np.float32)
    x = np.concatenate(
        [near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))]
    )
    x = x[(x * (np.float32(1) / s)).astype(np.float64) == np.tile(mids, 3)]  # exact ties in float32
    assert x.size >= 32
    x = x[: x.size // 8 * 8].reshape(-1, 8)
    runtime = qat.load_quantized(tmp_path / "e", TinyCNN())
    with torch.no_grad():
        got = runtime.fc(torch.from_numpy(x))
    compare(ref.forward("fc", x), got, int_gemm=True, where=f"fc at {fmt} ties")


# ---------------------------------------------------------------- the oracle itself
def test_the_oracle_imports_neither_torch_nor_qat():
    code = "import sys, helpers.oracle; bad = {'torch', 'qat'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=True)


def test_unpack_follows_the_documented_layout():
    # int4, offset -8: codes [-8, 7, 0, -1] -> u = [0, 15, 8, 7]; value i at bit 4 * (i % 2) of byte i // 2
    assert unpack_codes(np.array([0xF0, 0x78]), 4, 4, -8).tolist() == [-8, 7, 0, -1]
    # 2-bit ternary, offset -1: codes [1, -1, 0] -> u = [2, 0, 1] -> 0b01_00_10; one padded field
    assert unpack_codes(np.array([0b010010]), 2, 3, -1).tolist() == [1, -1, 0]
    # 1-bit: bits LSB first
    assert unpack_codes(np.array([0b1011]), 1, 4, 0).tolist() == [1, 1, 0, 1]


def test_fp8_decoding_and_rounding_follow_the_ocp_formats():
    for fmt, tdtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        every = torch.arange(256, dtype=torch.uint8)
        mine = fp8_decode(every.numpy(), fmt)
        theirs = every.view(tdtype).double().numpy()
        assert np.array_equal(mine, theirs, equal_nan=True)
    assert fp8_decode(np.array([0x7E, 0x01, 0x38]), "e4m3").tolist() == [448.0, 2.0**-9, 1.0]
    assert fp8_decode(np.array([0x7B, 0x3C]), "e5m2").tolist() == [57344.0, 1.0]
    # e4m3 steps are 1/8 in [1, 2): ties go to the even mantissa; beyond 448 it saturates
    got = round_to_fp8(np.array([1.0625, 1.1875, -1.1875, 1000.0, -1e6, 2.0**-10, 3 * 2.0**-10]), "e4m3")
    assert got.tolist() == [1.0, 1.25, -1.25, 448.0, -448.0, 0.0, 2.0**-8]
