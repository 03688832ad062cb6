"""The compressed-tensors target on tiny random Llamas (in_features 128 and 256, so group 128 fits): the
directory loads in transformers with the fake-quant model's logits, its tensors are what
compressed-tensors' own compressors make of the trained codes and scales, and its ``quantization_config``
selects the scheme vLLM runs (vLLM itself is not installed here: its selection rules are restated below)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")
require("compressed_tensors", extra="compressed-tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import qat  # noqa: E402
from qat.deploy import compressed_tensors as ct  # noqa: E402
from qat.deploy import schema  # noqa: E402
from qat.deploy.verify import VerificationError  # noqa: E402
from qat.hf.models import example_inputs, load_tokenizer, logits, tiny_model  # noqa: E402
from qat.quant.modules import effective_weight  # noqa: E402

LLAMA = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # 4 heads x 32 = 128


def _w(fmt: str, group: int | None = None, **kw) -> dict:
    gran = {"granularity": "per_group", "group_size": group} if group else {"granularity": "per_channel"}
    return {"format": fmt, "scale": "lsq", **gran, **kw}


TOKEN = {"format": "int8", "granularity": "per_token", "dynamic": True}
STATIC_ASYM = {"format": "int8", "granularity": "per_tensor", "scale": "ema", "symmetric": False}
FLOAT = {"exclude": ["lm_head", "model.embed_tokens"]}
CASES = {
    "w4a16_g32": {"weight": _w("int4", 32), "activation": None, **FLOAT},
    "w8a16": {"weight": _w("int8"), "activation": None, **FLOAT},
    "w8a8_token": {"weight": _w("int8"), "activation": TOKEN, **FLOAT},
    "w4a8_g32": {"weight": _w("int4", 32), "activation": TOKEN, **FLOAT},
    # attention W4A16 (group 128), MLP W8A8 with static asymmetric inputs: two groups, two formats
    "mixed": {"weight": _w("int4", 128), "activation": None, **FLOAT,
              "overrides": {"*.mlp.*": {"weight": _w("int8"), "activation": STATIC_ASYM}}},
}  # fmt: skip
# case -> {scheme: layers}, the global format, and the scheme vLLM picks for each config group
EXPECTED = {
    "w4a16_g32": ({"W4A16": 14}, "pack-quantized", {"WNA16"}),
    "w8a16": ({"W8A16": 14}, "pack-quantized", {"WNA16"}),
    "w8a8_token": ({"W8A8": 14}, "int-quantized", {"W8A8Int8 dynamic"}),
    "w4a8_g32": ({"W4A8": 14}, "pack-quantized", {None}),
    "mixed": ({"W4A16": 8, "W8A8": 6}, "mixed-precision", {"WNA16", "W8A8Int8 static"}),
}


def _batches() -> list:
    return [(example_inputs("llama", seed=s),) for s in range(2)]


def _prepared(cfg: dict, **sizes) -> nn.Module:
    model = tiny_model("llama", **sizes)
    qat.prepare(model, cfg)
    qat.calibrate(model, _batches(), forward=logits)
    model.train()  # a few steps: learned scales move away from their first values
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in _batches():
        logits(model, batch).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (fake-quant model, export directory, the target's figures), built once per case."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = _prepared(CASES[case], **LLAMA)
            out = tmp_path_factory.mktemp(case) / "e"
            tok = load_tokenizer() if case == "mixed" else None
            report = qat.export(model, out, batches=_batches(), targets="compressed-tensors", forward=logits,
                                tokenizer=tok)  # fmt: skip
            cache[case] = model, out, report.targets["compressed-tensors"]
        return cache[case]

    return get


def _block(out) -> dict:
    return json.loads((out / ct.NAME / "config.json").read_text())["quantization_config"]


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, "weight_quant", None) is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (a.max() - a.min()))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_directory_with_the_fake_quant_logits(case, exported):
    model, out, figures = exported(case)
    assert figures["passed"] and figures["schemes"] == EXPECTED[case][0]
    loaded = ct.load(out / ct.NAME)
    assert type(loaded) is type(model) and not hasattr(loaded.lm_head, "quantization_scheme")
    assert all(hasattr(loaded.get_submodule(n), "quantization_scheme") for n in _quantized(model))
    inputs = {n: m.input_quant.spec for n, m in _quantized(model).items() if m.input_quant is not None}
    dynamic, static = (
        [n for n, s in inputs.items() if s.dynamic],
        [n for n, s in inputs.items() if not s.dynamic],
    )
    for (x,) in _batches():
        # transformers computes float matmuls of dequantised values: the fake-quant model's float forward,
        # with transformers' own rule for dynamic inputs (amax / 127.5, where the model trained amax / 127);
        # static inputs in float on both sides (transformers divides by the scale, the model multiplies by
        # its inverse: they differ on rare ties)
        with torch.no_grad(), ct.float_inputs(model, loaded, static):
            got = logits(loaded, x)
        with torch.enable_grad(), ct.transformers_rule(model, dynamic), ct.float_inputs(model, None, static):
            want = logits(model, x).detach()
        assert _rel(want, got) <= ct.WEIGHT_TOL  # measured: 0.0
    # As trained: 0 for weight-only schemes; with dynamic inputs the rules differ (measured 7.4e-3 of the
    # logit range); with static inputs within twice the activation noise (ties).
    assert figures["max_rel_logit_diff"] <= (0.0 if not inputs else 2e-2)
    if static:
        assert figures["max_rel_logit_diff_best"] <= ct.ACT_NOISE_FACTOR * figures["activation_noise"]


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_are_compressed_tensors_own_compression_of_the_trained_grid(case, exported):
    model, out, _ = exported(case)
    block, saved = _block(out), load_file(out / ct.NAME / "model.safetensors")
    groups = {t: g for g in block["config_groups"].values() for t in g["targets"]}
    for name, mod in _quantized(model).items():
        group = groups.get(name, groups.get("Linear"))
        scheme = QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
        w = effective_weight(mod).detach()
        with torch.no_grad():
            _, trained, _ = mod.weight_quant.quantize(w)
            fake = mod.weight_quant(w)
        scale = saved[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, trained.reshape(scale.shape))  # trained
        assert scale.shape == (w.shape[0], w.shape[1] // (group["weights"]["group_size"] or w.shape[1]))
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        theirs = compressor.compress({"weight": fake, "weight_scale": scale}, scheme)
        ours = {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.weight")}
        assert ours.keys() == theirs.keys()
        for key, t in theirs.items():
            assert t.dtype == ours[key].dtype and torch.equal(t, ours[key]), (name, key)
        back = compressor.decompress(ours, scheme)["weight"]  # and back to the fake-quant weight, exactly
        assert torch.equal(back, fake)
        if mod.input_quant is not None and not mod.input_quant.spec.dynamic:  # static inputs: trained too
            s, z, _ = mod.input_quant.effective_qparams()
            assert torch.equal(saved[f"{name}.input_scale"], s.reshape(1))
            assert torch.equal(saved[f"{name}.input_zero_point"], z.reshape(1).to(torch.int8))


def _vllm_scheme(group: dict, fmt: str) -> str | None:
    """The scheme vLLM's CompressedTensorsConfig picks for a config group (its ``_get_scheme_from_parts``,
    read in vLLM's source: weight-only int 4/8 bit per channel or group in ``pack-quantized`` -> WNA16; 8-bit
    symmetric per-tensor/channel weights with 8-bit inputs in an activation format -> W8A8Int8)."""
    w, a = group["weights"], group["input_activations"]
    fmt = group.get("format") or fmt
    if a is None and fmt == "pack-quantized" and w["num_bits"] in (4, 8) and not w["dynamic"]:
        return "WNA16" if w["strategy"] in ("channel", "group") else None
    weights_ok = (
        w["num_bits"] == 8 and w["symmetric"] and not w["dynamic"] and w["strategy"] in ("tensor", "channel")
    )
    if a is None or fmt not in ("int-quantized", "naive-quantized") or not weights_ok or a["num_bits"] != 8:
        return None
    if a["strategy"] == "token" and a["dynamic"]:
        return "W8A8Int8 dynamic"
    return "W8A8Int8 static" if a["strategy"] == "tensor" and not a["dynamic"] else None


@pytest.mark.parametrize("case", list(CASES))
def test_config_block_selects_the_scheme_vllm_runs(case, exported):
    model, out, figures = exported(case)
    config = json.loads((out / ct.NAME / "config.json").read_text())
    block = config["quantization_config"]
    QuantizationConfig.model_validate(block)  # compressed-tensors' own schema
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert block["quant_method"] == "compressed-tensors" and block["quantization_status"] == "compressed"
    assert block["format"] == EXPECTED[case][1] and block["ignore"] == ["lm_head"]
    picked = {_vllm_scheme(g, block["format"]) for g in block["config_groups"].values()}
    assert picked == EXPECTED[case][2]
    targets = [t for g in block["config_groups"].values() for t in g["targets"]]
    if len(block["config_groups"]) == 1:
        assert targets == ["Linear"]
    else:  # every quantized layer by name, once
        assert sorted(targets) == sorted(_quantized(model))
    assert (
        figures["config_groups"] == len(block["config_groups"])
        and figures["scales_exact"]["bfloat16"] is False
    )


def test_the_tokenizer_and_generation_config_are_written(exported):
    _, out, _ = exported("mixed")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / ct.NAME)("hello").input_ids
    assert (out / ct.NAME / "generation_config.json").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_is_compressed_tensors_own(bits):
    g = torch.Generator().manual_seed(bits)
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (6, 64), generator=g, dtype=torch.int16)
    assert torch.equal(ct.pack_int32(q, bits), pack_to_int32(q.to(torch.int8), bits))


def test_the_qat_eval_engine_runs_the_directory(exported):
    model, out, _ = exported("w4a16_g32")
    predict = ct.run(out / ct.NAME, tiny_model("llama", seed=1, **LLAMA), None)
    x = _batches()[0][0]
    with torch.no_grad():
        assert torch.equal(predict(x), logits(ct.load(out / ct.NAME), x))


# ------------------------------------------------------------------------------------------------ refusals
def _entry(exported, **change) -> dict:
    _, out, _ = exported("w8a8_token")
    layer = json.loads((out / schema.CONFIG_FILE).read_text())["layers"]["model.layers.0.mlp.up_proj"]
    for key, value in change.items():
        side, _, field = key.partition("__")
        layer[side] = {**layer[side], field: value} if field else value
    return layer


@pytest.mark.parametrize(
    "change, scheme, strategy, group",
    [
        ({"weight__bits": 4, "weight__format": "int4", "input": None}, "W4A16", "channel", None),
        ({"weight__granularity": "per_group", "weight__group_size": 64, "input": None}, "W8A16", "group", 64),
        ({"input__dynamic": False, "input__granularity": "per_tensor"}, "W8A8", "channel", None),
    ],
)
def test_other_grids_vllm_runs_map_to_their_scheme(exported, change, scheme, strategy, group):
    g = ct.group_of("model.layers.0.mlp.up_proj", _entry(exported, **change), linear=True)
    w = dict(g.weights)
    assert g.scheme.name == scheme and (w["strategy"], w["group_size"], w["num_bits"]) == (
        strategy, group, 4 if scheme == "W4A16" else 8)  # fmt: skip


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"weight__symmetric": False}, "weight int8 per_channel lsq asym"),
        ({"weight__granularity": "per_group", "weight__group_size": 16}, "per_group(16)"),
        ({"weight__granularity": "per_tensor"}, "weight int8 per_tensor"),
        ({"weight__kind": "ternary", "weight__format": "ternary", "weight__scale_source": "twn"}, "ternary"),
        ({"weight__kind": "fp8", "weight__format": "fp8_e4m3", "weight__scale_source": "minmax"}, "fp8_e4m3"),
        ({"input__symmetric": False}, "input int8 per_token dynamic asym"),
        ({"input__format": "uint8"}, "input uint8"),
        ({"input__smooth": {"tensor": "s"}}, "with SmoothQuant"),
        ({"weight__granularity": "per_group", "weight__group_size": 32}, "input int8 per_token dynamic"),
    ],
)
def test_layers_without_a_scheme_are_refused_naming_layer_and_formats(exported, change, shown):
    with pytest.raises(ct.UnsupportedError) as e:
        ct.group_of("model.layers.0.mlp.up_proj", _entry(exported, **change), linear=True)
    msg = str(e.value)
    assert (
        "'model.layers.0.mlp.up_proj' (Linear, " in msg and shown in msg and "; supported: int4/int8" in msg
    )
    assert "\n" not in msg


def test_non_linear_layers_and_unexact_scales_are_refused(exported):
    with pytest.raises(ct.UnsupportedError, match="Embedding"):
        ct.group_of(
            "model.embed_tokens", {**_entry(exported), "module": "Embedding", "op": "embedding"}, False
        )
    _, out, _ = exported("w8a16")
    cfg = schema.read_config(out / schema.CONFIG_FILE)
    tensors = load_file(out / schema.WEIGHTS_FILE)
    name = "model.layers.0.mlp.up_proj"
    group = ct.group_of(name, cfg["layers"][name], True)
    with pytest.raises(ct.UnsupportedError, match="not exactly representable in the model dtype bfloat16"):
        ct.layer_tensors(name, cfg["layers"][name], group, tensors, torch.bfloat16)


def test_an_unsupported_model_fails_the_export_and_writes_nothing(tmp_path):
    model = _prepared({"weight": _w("int4", 32, symmetric=False), "activation": None, **FLOAT})
    with pytest.raises(
        ct.UnsupportedError, match=r"layer 'model.layers.0.self_attn.q_proj' \(Linear, weight int4"
    ):
        qat.export(model, tmp_path / "e", verify=False, targets="compressed-tensors", forward=logits)
    assert not (tmp_path / "e").exists()


def test_a_wrong_scale_fails_verification_and_writes_nothing(tmp_path, monkeypatch):
    model = _prepared({"weight": _w("int4", 32), "activation": None, **FLOAT})
    real = ct.layer_tensors

    def off_by_a_bit(name, *args):
        out = real(name, *args)
        out[f"{name}.weight_scale"] = out[f"{name}.weight_scale"] * 1.001
        return out

    monkeypatch.setattr(ct, "layer_tensors", off_by_a_bit)
    with pytest.raises(VerificationError, match="compressed-tensors: transformers' logits differ"):
        qat.export(model, tmp_path / "e", batches=_batches(), targets="compressed-tensors", forward=logits)
    assert not (tmp_path / "e").exists()
