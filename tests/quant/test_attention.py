"""Optional fake quantization of the attention-matmul inputs (q, k, v) of Hugging Face models, by
``qat.prepare`` alone."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")

import qat  # noqa: E402
from qat.config import QuantConfigError  # noqa: E402
from qat.hf.models import FAMILIES, example_inputs, logits, tiny_model  # noqa: E402
from qat.quant.attention import AttentionHookError, add_attention_hooks, hf_attention_modules  # noqa: E402
from qat.quant.quantizer import FakeQuantizer  # noqa: E402

W8 = {"weight": {"format": "int8", "granularity": "per_channel"}}
ATT = {"format": "int4", "granularity": "per_tensor", "symmetric": False, "scale": "ema"}


def test_attention_stays_float_by_default():
    model = tiny_model("bert")
    qat.prepare(model, W8)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "q_quant") for m in hf_attention_modules(model))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_hooks_leave_outputs_bit_identical(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    x = example_inputs(family)
    ref = logits(model, x)
    add_attention_hooks(model)
    assert model.config._attn_implementation == f"qat_{impl}"
    assert len(hf_attention_modules(model)) == 2  # one per layer in the toy configs
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_spec_fake_quantizes_q_k_v(family):
    model = tiny_model(family)
    x = example_inputs(family)
    ref = logits(model, x)
    qat.prepare(model, dict(W8, attention=ATT))
    hooks = ("q_quant", "k_quant", "v_quant")
    hooked = [n for n, _ in qat.quantizers(model) if n.rsplit(".", 1)[-1] in hooks]
    assert len(hooked) == 6
    qat.calibrate(model, [(x,)], forward=logits)
    out = logits(model, x)
    assert torch.isfinite(out).all()
    only_weights = tiny_model(family)
    qat.prepare(only_weights, W8)
    # int4 q/k/v move the outputs further from float than the int8 weights alone.
    assert (out - ref).abs().max() > (logits(only_weights, x) - ref).abs().max()
    fq = model.get_submodule(hooked[0])
    assert isinstance(fq, FakeQuantizer) and fq.role == "activation" and fq.spec.format == "int4"


def test_attention_export_reloads_into_a_fresh_skeleton(tmp_path):
    model = tiny_model("llama")
    qat.prepare(model, dict(W8, attention=ATT))
    batches = [(example_inputs("llama", seed=s),) for s in range(2)]
    qat.calibrate(model, batches, forward=logits)
    model.eval()
    report = qat.export(model, tmp_path / "e", batches=batches, forward=logits)
    assert report.verification["passed"]
    assert sum(r["module"] == "attention" for r in report.layers) == 6
    runtime = qat.load_quantized(tmp_path / "e", tiny_model("llama", seed=3))  # hooks added on load
    torch.testing.assert_close(logits(runtime, batches[0]), logits(model, batches[0]), rtol=1e-4, atol=1e-4)


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model("bert")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(AttentionHookError, match="'flex_attention' is not supported; allowed: sdpa, eager"):
        add_attention_hooks(model)


def test_model_without_attention_modules_is_refused():
    with pytest.raises(AttentionHookError, match="quant.attention"):
        add_attention_hooks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_failed_prepare_adds_no_hooks_and_keeps_the_implementation():
    """``qat.prepare`` adds the hooks itself, only once nothing can fail (all or nothing)."""
    model = tiny_model("bert")
    bad_group = {"weight": {"format": "int4", "granularity": "per_group", "group_size": 48}}
    with pytest.raises(QuantConfigError, match="group_size: 48 does not divide"):
        qat.prepare(model, dict(bad_group, attention=ATT))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(AttentionHookError, match="'flex_attention' is not supported"):
        qat.prepare(model, dict(W8, attention=ATT))
    assert model.config._attn_implementation == "flex_attention"
    assert not any(hasattr(m, "q_quant") for m in hf_attention_modules(model))
    assert not list(qat.quantizers(model))
