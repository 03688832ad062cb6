"""Tied weights: one shared quantizer through prepare, training and export, or a clear refusal."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")

import qat  # noqa: E402
from qat.hf.models import example_inputs, logits, tiny_model  # noqa: E402
from qat.quant.tied import TiedWeightError, tied_groups  # noqa: E402

W4 = {"weight": {"format": "int4", "granularity": "per_group", "group_size": 32, "scale": "lsq"}}
LM_HEAD_8BIT = {"lm_head": {"weight": {"format": "int8", "granularity": "per_channel"}}}


def test_gpt2_tied_pair_shares_one_quantizer_through_training():
    model = tiny_model("gpt2")
    assert tied_groups(model) == [["transformer.wte", "lm_head"]]
    qat.prepare(model, W4)
    assert model.qat_tied == [["transformer.wte", "lm_head"]]
    assert model.lm_head.weight_quant is model.transformer.wte.weight_quant
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        logits(model, (example_inputs("gpt2", seed=s),)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.quantized_weight(), model.transformer.wte.quantized_weight())


def test_export_stores_the_tied_weight_once(tmp_path):
    model = tiny_model("gpt2")
    qat.prepare(model, W4)
    val = [(example_inputs("gpt2", seed=9),)]
    qat.export(model, tmp_path / "e", batches=val, forward=logits)
    cfg = json.loads((tmp_path / "e" / "quant_config.json").read_text())
    wte, head = cfg["layers"]["transformer.wte"]["weight"], cfg["layers"]["lm_head"]["weight"]
    assert wte["codes"]["tensor"] == head["codes"]["tensor"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        codes = [k for k in f.keys() if k.endswith(".weight.codes")]
    assert sum(k.startswith(("transformer.wte.", "lm_head.")) for k in codes) == 1


def test_different_specs_on_a_tied_pair_are_refused_and_the_model_left_float():
    model = tiny_model("gpt2")
    with pytest.raises(TiedWeightError, match=r"transformer\.wte .*lm_head .*tied='untie'"):
        qat.prepare(model, dict(W4, overrides=LM_HEAD_8BIT))
    assert not list(qat.quantizers(model))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_excluding_one_side_of_a_tied_pair_is_refused():
    model = tiny_model("bert")  # the MLM decoder is tied to the word embeddings
    with pytest.raises(TiedWeightError, match="float"):
        qat.prepare(model, dict(W4, exclude=["cls.predictions.decoder"]))


def test_untie_override_gives_each_layer_its_own_copy():
    model = tiny_model("gpt2")
    qat.prepare(model, dict(W4, overrides=LM_HEAD_8BIT), tied="untie")
    assert model.lm_head.weight is not model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight_quant.spec.format == "int8"
