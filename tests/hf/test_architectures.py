"""Six Hugging Face architectures at toy sizes (random weights, built from config), with ``import qat``
alone: prepare -> train a few steps -> export -> reload in the integer runtime into a fresh skeleton ->
same outputs, and every Linear / Conv1D / Conv layer quantized."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")

import qat  # noqa: E402
from qat.deploy.verify import check, compare  # noqa: E402
from qat.hf.models import ENCODERS, FAMILIES, example_inputs, logits, tiny_model  # noqa: E402
from qat.rewrite import UNKNOWN_TYPE  # noqa: E402

W8A8 = {
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "lsq"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
}
W4G32A8DYN = {
    "weight": {"format": "int4", "granularity": "per_group", "group_size": 32, "scale": "lsq"},
    "activation": {"format": "int8", "granularity": "per_token", "symmetric": False, "dynamic": True},
}
CASES = [(f, "w8a8") for f in FAMILIES + ENCODERS] + [(f, "w4g32a8dyn") for f in FAMILIES]
CONFIGS = {"w8a8": W8A8, "w4g32a8dyn": W4G32A8DYN}
LAYER_TYPES = ("Linear", "Conv1D", "Conv1d", "Conv2d")


def _train(model: torch.nn.Module, family: str, steps: int = 3) -> None:
    batches = [(example_inputs(family, seed=s),) for s in range(steps)]
    qat.calibrate(model, batches, forward=logits)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in batches:
        loss = logits(model, batch).float().square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any("weight_quant" in n for n in changed) and any(n.endswith(".weight") for n in changed)
    model.eval()


@pytest.mark.parametrize(("family", "quant"), CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_prepare_train_export_reload_matches(family, quant, tmp_path):
    model = tiny_model(family)
    layers = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in LAYER_TYPES}
    qat.prepare(model, CONFIGS[quant])
    report = model.qat_report
    assert not [r for r in report.skipped if r.reason == UNKNOWN_TYPE], str(report)
    assert set(layers) <= {r.name for r in report.quantized}  # every Linear / Conv1D / Conv quantized
    _train(model, family)
    val = [(example_inputs(family, seed=100 + s),) for s in range(2)]
    exported = qat.export(model, tmp_path / "export", batches=val, forward=logits)
    assert exported.verification is not None and exported.verification["passed"]
    skeleton = tiny_model(family, seed=1)  # different random weights: everything must come from the export
    runtime = qat.load_quantized(tmp_path / "export", skeleton)
    figures = compare(model, runtime, val, forward=logits)
    assert check(figures, None) == [], figures  # max |difference| <= 1e-3 of the output range
    assert figures["top1_agreement"] == 1.0
    if quant == "w8a8":  # per-channel int8 weights with per-tensor int8 activations run as integer GEMMs
        assert any(getattr(m, "uses_int_mm", False) for m in runtime.modules())


def test_layer_norms_stay_float_and_heads_follow_config():
    model = tiny_model("llama")
    head_8bit = {"lm_head": {"weight": {"format": "int8", "granularity": "per_channel"}}}
    cfg = dict(W4G32A8DYN, overrides=head_8bit)
    qat.prepare(model, cfg)
    rows = {r.name: r for r in model.qat_report.quantized}
    assert rows["lm_head"].weight.startswith("int8 per_channel")
    assert rows["model.layers.0.mlp.down_proj"].weight.startswith("int4 per_group(32)")
    assert not any("norm" in n for n in rows)  # RMSNorm is not a quantizable layer type


def test_lm_head_can_stay_float_when_untied():
    model = tiny_model("llama")  # Llama does not tie lm_head to the embeddings
    qat.prepare(model, dict(W8A8, exclude=["lm_head"]))
    assert type(model.lm_head) is torch.nn.Linear
