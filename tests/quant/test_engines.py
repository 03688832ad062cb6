"""Engine rules (``qat.quant.engines``) against the engines' own quantizers, bit for bit: llama.cpp's block
formats (``scale: gguf``) against ``gguf.quants``, vLLM's dynamic int8 kernels against hand-written
references, compressed-tensors' dynamic activations against the installed library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.extras import require
from helpers.quantizers import fq
from omegaconf import OmegaConf
from torch import nn

import qat
from qat.conf import CONFIG_DIR
from qat.config import QuantConfig, QuantConfigError, QuantSpec
from qat.quant import engines
from qat.quant.modules import is_quant_module

gguf_quants = require("gguf.quants", extra="gguf")
GGML = require("gguf", extra="gguf").GGMLQuantizationType

PRESETS = {"Q8_0": "gguf_q8_0", "Q4_0": "gguf_q4_0", "TQ2_0": "gguf_tq2_0"}
BLOCK = {"Q8_0": 32, "Q4_0": 32, "TQ2_0": 256}
FORMAT = {"Q8_0": "int8", "Q4_0": "int4", "TQ2_0": "ternary"}
D_AT = {"Q8_0": 0, "Q4_0": 0, "TQ2_0": 64}  # byte offset of the fp16 scale in a block
# Blocks whose codes sit exactly on a rounding tie: (scale d, the block's extreme value, tie values), in
# units of d, so ``x * (1/d)`` is exact. Q8_0/TQ2_0 round ties away from zero, Q4_0 rounds them up.
TIES = {
    "Q8_0": (2.0**-3, 127.0, [k + 0.5 for k in range(-60, 60)]),
    "Q4_0": (2.0**-2, -8.0, [k + 0.5 for k in range(-8, 7)]),
    "TQ2_0": (1.0, 1.0, [0.5, -0.5]),
}


def spec(t: str) -> QuantSpec:
    return QuantSpec(format=FORMAT[t], granularity="per_group", group_size=BLOCK[t], scale="gguf")


def hard_weights(t: str, rows: int = 8, cols: int = 512) -> torch.Tensor:
    """Random blocks at mixed scales plus the hard cases: ties, the largest magnitude twice with both
    signs (the first wins), a negative extreme, zeros, an all-zero block, an fp16 subnormal scale."""
    n, g = BLOCK[t], torch.Generator().manual_seed(0)
    count = rows * cols // n
    blocks = torch.randn(count, n, generator=g) * 10 ** torch.empty(count, 1).uniform_(-2, 1, generator=g)
    d, top, halves = TIES[t]
    blocks[0] = d * torch.tensor(([top] + halves * n)[:n])
    blocks[1] = torch.randn(n, generator=g)
    blocks[1, 3], blocks[1, 7] = 9.0, -9.0  # |max| twice: the first (+9) gives the sign
    blocks[2, 5] = -3 * blocks[2].abs().max()  # the signed extreme is negative
    blocks[3, ::3] = 0.0
    blocks[4] = 0.0
    blocks[5] *= 1e-4 / blocks[5].abs().max()  # d ~ 8e-7 (Q8_0): an fp16 subnormal, still exact
    return blocks.reshape(rows, cols)


def reference(w: torch.Tensor, t: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's reference quantizer via ``gguf.quants``: codes ``[rows, cols]``, the fp16 scales as
    stored ``[rows, cols / block]`` and the dequantized weight."""
    qtype = GGML[t]
    raw = gguf_quants.quantize(w.numpy(), qtype)
    blocks = raw.reshape(-1, raw.shape[-1] * BLOCK[t] // w.shape[1]).copy()
    at = D_AT[t]
    d = blocks[:, at : at + 2].copy().view(np.float16).reshape(w.shape[0], -1)
    blocks[:, at : at + 2] = np.array([1.0], np.float16).view(np.uint8)  # d = 1: dequantize gives the codes
    codes = gguf_quants.dequantize(blocks.reshape(raw.shape), qtype)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(gguf_quants.dequantize(raw, qtype))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def assert_is_llama_cpp(q, w: torch.Tensor) -> None:
    """The fake-quant weight, codes and fp16 scales are llama.cpp's for ``w``, bit for bit, and llama.cpp's
    quantizer run over the fake-quant weight changes no code."""
    t, codes, d = engines.gguf_blocks(q, w)
    ref_codes, ref_d, ref_value = reference(w, t)
    assert torch.equal(codes, ref_codes.to(torch.int8)) and torch.equal(bits(d), bits(ref_d))
    with torch.no_grad():
        value = q(w)
    assert torch.equal(bits(value), bits(ref_value))
    again_codes, again_d, again = reference(value, t)
    assert int((again_codes != ref_codes).sum()) == 0
    # (equal values: an all-zero Q4_0 block stores d = -0.0, its re-quantization +0.0)
    assert torch.equal(again_d, ref_d) and torch.equal(again, ref_value)


# ---------------------------------------------------------------- weights: llama.cpp's block formats
@pytest.mark.parametrize("t", list(PRESETS))
def test_ptq_equals_llama_cpp_reference_and_requantizes_to_the_same_codes(t: str) -> None:
    w = hard_weights(t)
    q = fq(shape=w.shape, **spec(t).to_dict())
    assert q.spec.ggml_type == t and q.scale is None and q.target_bits is None  # no state, fixed width
    assert_is_llama_cpp(q, w)


def _round_half_even_q8_0() -> engines.BlockRule:
    return engines.BlockRule(engines.GGUF_RULES["Q8_0"].block, torch.round)


def _fp32_scale_q8_0() -> engines.BlockRule:
    def block(rows):
        d = rows.abs().amax(dim=1) / 127
        return d, torch.reciprocal(d)

    return engines.BlockRule(block, engines.GGUF_RULES["Q8_0"].round)


def _last_wins_q4_0() -> engines.BlockRule:
    def block(rows):
        flipped = rows.flip(1)
        mx = flipped.gather(1, flipped.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        d = mx / -8
        return d.half().float(), torch.reciprocal(d)

    return engines.BlockRule(block, engines.GGUF_RULES["Q4_0"].round)


def _round_half_even_q4_0() -> engines.BlockRule:
    return engines.BlockRule(engines.GGUF_RULES["Q4_0"].block, torch.round)


@pytest.mark.parametrize(
    "t,bug",
    [("Q8_0", _round_half_even_q8_0), ("Q8_0", _fp32_scale_q8_0), ("Q4_0", _last_wins_q4_0),
     ("Q4_0", _round_half_even_q4_0), ("TQ2_0", lambda: engines.BlockRule(
         engines.GGUF_RULES["TQ2_0"].block, torch.round))],
    ids=["q8_0-half-even", "q8_0-fp32-scale", "q4_0-last-max-wins", "q4_0-half-even", "tq2_0-half-even"],
)  # fmt: skip
def test_the_reference_check_catches_plausible_bugs(t: str, bug, monkeypatch) -> None:
    monkeypatch.setitem(engines.GGUF_RULES, t, bug())
    w = hard_weights(t)
    with pytest.raises(AssertionError):
        assert_is_llama_cpp(fq(shape=w.shape, **spec(t).to_dict()), w)


def test_q4_0_scale_is_signed_and_codes_span_minus_8_to_7() -> None:
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([1.0, -0.5, 0.25, -1.0])  # the first largest magnitude is +1: d = -1/8 < 0
    w[1, :2] = torch.tensor([-2.0, 2.0])  # -2 first: d = +1/4
    q = fq(shape=w.shape, **spec("Q4_0").to_dict())
    t, codes, d = engines.gguf_blocks(q, w)
    assert (t, d.tolist()) == ("Q4_0", [[-0.125], [0.25]])
    assert codes[0, :4].tolist() == [-8, 4, -2, 7]  # -1.0 * id = 8 clips to 7: value -0.875
    assert codes[1, :2].tolist() == [-8, 7] and int(codes.min()) >= -8 and int(codes.max()) <= 7


@pytest.mark.parametrize("t", list(PRESETS))
def test_straight_through_gradient_clipped_where_the_codes_clip(t: str) -> None:
    w = hard_weights(t).requires_grad_()
    q = fq(shape=w.shape, **spec(t).to_dict())
    q(w).backward(torch.ones_like(w))
    blocks = w.detach().reshape(-1, BLOCK[t])
    d = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)) / -8
    xs = blocks * torch.where(d == 0, 0.0, torch.reciprocal(d))  # Q4_0's scaled values
    clipped = (torch.trunc(xs + 8.5) > 15).reshape(w.shape) if t == "Q4_0" else torch.zeros_like(w) > 0
    assert torch.equal(w.grad, (~clipped).float()) and (clipped.any() or t != "Q4_0")
    assert [p for p in q.parameters()] == []  # nothing learned: the scale is a rule of the weight


# ---------------------------------------------------------------- activations as llama.cpp quantizes them
def test_q8_0_activation_rule_equals_gguf_on_every_row() -> None:
    x = hard_weights("Q8_0", rows=12, cols=128).reshape(3, 4, 128)
    q = fq("activation", format="int8", granularity="per_group", group_size=32, dynamic=True, scale="gguf")
    with torch.no_grad():
        y = q(x)
    ref = gguf_quants.dequantize(gguf_quants.quantize(x.reshape(-1, 128).numpy(), GGML.Q8_0), GGML.Q8_0)
    assert torch.equal(bits(y), bits(torch.from_numpy(ref).reshape(x.shape)))


def q8_k_reference(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q8_K_ref`` + ``d * q`` (ggml-quants.c), blocks of 256 along the last dimension."""
    out = np.empty_like(x, dtype=np.float32)
    for b, block in enumerate(x.astype(np.float32).reshape(-1, 256)):
        mx = block[np.argmax(np.abs(block))]  # the first of largest magnitude
        if mx == 0:
            out.reshape(-1, 256)[b] = 0.0
            continue
        iscale = np.float32(-127.0) / mx
        q = np.minimum(127, np.rint(iscale * block))  # nearest_int: half to even
        out.reshape(-1, 256)[b] = (np.float32(1.0) / iscale) * q
    return out


def test_q8_k_activation_rule_equals_ggml_reference() -> None:
    x = hard_weights("TQ2_0", rows=6, cols=512).reshape(2, 3, 512)
    q = fq("activation", format="int8", granularity="per_group", group_size=256, dynamic=True, scale="gguf")
    assert q.spec.ggml_type == "Q8_K"
    with torch.no_grad():
        assert torch.equal(q(x), torch.from_numpy(q8_k_reference(x.numpy())))


# ---------------------------------------------------------------- vLLM and compressed-tensors, per token
# A token where vLLM's CPU kernel (x * (1 / (amax / 127))) and its CUDA kernel (x * (127 / amax)) disagree.
VLLM_SPLIT = torch.tensor([[float.fromhex("0x1.71ba98p+0"), float.fromhex("-0x1.1a643p-1")]])


def vllm_reference(x: torch.Tensor, cuda: bool) -> torch.Tensor:
    """vLLM's ``dynamic_scaled_int8_quant`` then ``q * scale`` (csrc/cpu/quant.cpp, csrc/quantization/
    compressed_tensors/int8_quant_kernels.cu), in numpy float32."""
    xn = x.numpy().astype(np.float32)
    amax = np.abs(xn).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    mul = np.float32(127) / amax if cuda else (1.0 / scale.astype(np.float64)).astype(np.float32)
    return torch.from_numpy(np.clip(np.rint(xn * mul), -128, 127) * scale)


def test_minmax_per_token_is_vllms_cpu_kernel_and_scale_vllm_its_cuda_kernel() -> None:
    minmax = fq("activation", format="int8", granularity="per_token", dynamic=True, symmetric=True)
    vllm = fq("activation", format="int8", granularity="per_token", dynamic=True, scale="vllm")
    x = torch.randn(4, 16, 256) * torch.rand(4, 16, 1) * 5
    with torch.no_grad():
        for tokens in (x, VLLM_SPLIT):
            assert torch.equal(minmax(tokens), vllm_reference(tokens, cuda=False))
            assert torch.equal(vllm(tokens), vllm_reference(tokens, cuda=True))
        assert not torch.equal(minmax(VLLM_SPLIT), vllm(VLLM_SPLIT))  # the kernels differ on this token


def test_compressed_tensors_rule_equals_the_librarys_dynamic_token_forward() -> None:
    require("compressed_tensors", extra="compressed-tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(8, 32, 1024) * torch.rand(8, 32, 1) * 3  # 3-D, as transformers' linear inputs
    x[0, 0] = 0.0
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=nn.Module())
    ref = fake_quantize(x, scale, zero_point, args)
    q = fq("activation", format="int8", granularity="per_token", dynamic=True, scale="compressed_tensors")
    minmax = fq("activation", format="int8", granularity="per_token", dynamic=True, symmetric=True)
    with torch.no_grad():
        assert torch.equal(q(x), ref) and not torch.equal(minmax(x), ref)  # amax / 127.5, x / scale


# ---------------------------------------------------------------- configs
def _preset(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "quant" / f"{name}.yaml"))
    assert isinstance(cfg, dict)
    cfg.pop("name")
    return cfg


@pytest.mark.parametrize("t,act", [("Q8_0", "Q8_0"), ("Q4_0", "Q8_0"), ("TQ2_0", "Q8_K")])
def test_presets_train_on_the_block_format_and_llama_cpps_activation_blocks(t: str, act: str) -> None:
    cfg = QuantConfig.from_dict(_preset(PRESETS[t]))
    assert (cfg.weight.ggml_type, cfg.activation.ggml_type, cfg.activation.dynamic) == (t, act, True)


SPEC_ERRORS = [
    ({"format": "int5", "scale": "gguf"}, "spec.format", "'int5'", "int8 (Q8_0), int4 (Q4_0), ternary"),
    ({"format": "int4", "scale": "gguf"}, "spec.granularity", "'per_tensor'", "per_group with scale=gguf"),
    ({"format": "int4", "granularity": "per_group", "group_size": 64, "scale": "gguf"}, "spec.group_size",
     "64", "32 (Q4_0) for format int4"),
    ({"format": "ternary", "granularity": "per_group", "group_size": 32, "scale": "gguf"}, "spec.group_size",
     "32", "256 (TQ2_0)"),
    ({"format": "int8", "granularity": "per_group", "group_size": 32, "scale": "gguf", "symmetric": False},
     "spec.symmetric", "False", "true with scale=gguf"),
    ({"format": "binary", "scale": "gguf"}, "spec.scale", "'gguf'", "mean, lsq"),
    ({"scale": "vllm"}, "spec.dynamic", "False", "true with scale=vllm"),
    ({"format": "uint8", "scale": "vllm", "dynamic": True}, "spec.format", "'uint8'", "int2..int8"),
    ({"scale": "compressed_tensors", "dynamic": True, "symmetric": False}, "spec.symmetric", "False",
     "symmetric with scale=compressed_tensors"),
    ({"dynamic": True, "scale": "ema"}, "spec.scale", "'ema'", "minmax, gguf, vllm, compressed_tensors"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,key,value,allowed", SPEC_ERRORS)
def test_spec_errors_name_key_value_and_allowed(kwargs, key, value, allowed) -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantSpec(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: {value} is not valid; allowed: ") and allowed in msg and "\n" not in msg


Q8_K_ACT = {"format": "int8", "granularity": "per_group", "group_size": 256, "scale": "gguf", "dynamic": True}
SIDE_ERRORS = [
    ({"weight": {**Q8_K_ACT, "dynamic": False}}, "quant.weight.format", "'int8 per_group(256)'",
     "int8 per_group(32), int4 per_group(32), ternary per_group(256) for weights"),
    ({"activation": {**Q8_K_ACT, "format": "int4", "group_size": 32}}, "quant.activation.format",
     "'int4 per_group(32)'", "int8 per_group(32), int8 per_group(256) for activations"),
    ({"activation": {**Q8_K_ACT, "dynamic": False}}, "quant.activation.dynamic", "False",
     "true with scale=gguf"),
]  # fmt: skip


@pytest.mark.parametrize("cfg,key,value,allowed", SIDE_ERRORS)
def test_side_errors_name_key_value_and_allowed(cfg, key, value, allowed) -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantConfig.from_dict(cfg)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: {value} is not valid; allowed: ") and allowed in msg


# ---------------------------------------------------------------- training and the native export
def _mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16))


@pytest.mark.parametrize("t", list(PRESETS))
def test_after_training_steps_the_weights_are_still_llama_cpps(t: str) -> None:
    torch.manual_seed(0)
    model = qat.prepare(_mlp(), _preset(PRESETS[t]))
    before = [m.weight.detach().clone() for m in model.modules() if is_quant_module(m)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 256)), torch.randint(0, 16, (8,))).backward()
        opt.step()
    model.eval()
    x = torch.randn(4, 256)
    for layer, old in zip([m for m in model.modules() if is_quant_module(m)], before, strict=True):
        assert not torch.equal(layer.weight, old)  # the weights moved
        assert_is_llama_cpp(layer.weight_quant, layer.weight.detach())
        with torch.no_grad():  # the layer's own eval forward uses exactly these weights
            w = reference(layer.weight.detach(), t)[2]
            assert torch.equal(layer(x), nn.functional.linear(layer.input_quant(x), w, layer.bias))
            x = torch.relu(layer(x))


@pytest.mark.parametrize("t", list(PRESETS))
def test_native_export_round_trips_bit_for_bit(t: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = qat.prepare(_mlp(), _preset(PRESETS[t])).eval()
    batches = [(torch.randn(8, 256), torch.randint(0, 16, (8,))) for _ in range(2)]
    report = qat.export(model, tmp_path / "e", batches=batches, task="classification")
    assert report.verification["passed"] and report.verification["max_abs_logit_diff"] == 0.0
    runtime = qat.load_quantized(tmp_path / "e", _mlp())
    with torch.no_grad():
        assert all(torch.equal(runtime(x), model(x)) for x, _ in batches)
