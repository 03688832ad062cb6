"""SmoothQuant on transformers models: every family (GPT-2's transposed Conv1D included) trains, exports
and reloads with the runtime equal to the fake-quant model; a smoothed layer on a tied pair is refused."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require
from helpers.oracle_check import assert_matches_oracle

require("transformers", extra="transformers")

import qat  # noqa: E402
from qat.hf.models import FAMILIES, example_inputs, logits, tiny_model  # noqa: E402
from qat.quant.tied import TiedWeightError  # noqa: E402

W8A8_SMOOTH = {
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "minmax"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "lsq"},
    "smooth": 0.8,
}
# Heads tied to the word embeddings: one set of codes cannot be both W * s and W.
TIED_HEAD = {"gpt2": "lm_head", "bert": "cls.predictions.decoder"}


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothed_model_trains_exports_and_reloads_exactly(family, tmp_path):
    model = tiny_model(family)
    head = TIED_HEAD.get(family)
    qat.prepare(model, dict(W8A8_SMOOTH, overrides={head: {"smooth": None}} if head else {}))
    smoothed = [n for n, m in model.named_modules() if getattr(m, "smooth", None) is not None]
    assert len(smoothed) >= 4
    batches = [(example_inputs(family, seed=s),) for s in range(3)]
    qat.calibrate(model, batches, forward=logits)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches:
        logits(model, batch).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = [(example_inputs(family, seed=100 + s),) for s in range(2)]
    report = qat.export(model, tmp_path / "e", batches=val, forward=logits)
    assert report.verification["passed"]
    runtime = qat.load_quantized(tmp_path / "e", tiny_model(family, seed=1))
    with torch.no_grad():
        for batch in val:
            assert torch.equal(logits(runtime, batch), logits(model, batch))
    # Every quantized layer against the independent reference (helpers.oracle), on the inputs it sees.
    assert_matches_oracle(
        tmp_path / "e", lambda: tiny_model(family, seed=1), val, runtime=runtime, fake_quant=model,
        forward=logits, whole_model=False,
    )  # fmt: skip


def test_smoothing_a_tied_head_is_refused_and_the_model_left_float():
    model = tiny_model("gpt2")
    with pytest.raises(TiedWeightError, match=r"lm_head .*quant\.overrides: \{lm_head: \{smooth: null\}\}"):
        qat.prepare(model, W8A8_SMOOTH)
    assert not list(qat.quantizers(model))
