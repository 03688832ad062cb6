"""QAT-LoRA (qat.quant.lora): frozen fake-quantized weights, adapters inside the quantizer, merged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.quant.lora import LoRAConfig, add_lora, merge_lora


def _model() -> nn.Module:
    torch.manual_seed(0)
    return qat.prepare(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), "gguf_q4_0")


def test_adapters_are_the_only_trained_weights_and_start_at_the_prepared_model():
    model = _model()
    x = torch.randn(4, 64)
    before = model(x)
    names = add_lora(model, LoRAConfig(rank=2, targets=["0"]))
    assert names == ["0"] and torch.equal(model(x), before)  # B = 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"0.parametrizations.weight.0.A", "0.parametrizations.weight.0.B"}


def test_the_adapter_is_fake_quantized_with_the_weight_and_merging_changes_nothing():
    model = _model()
    add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 64)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    lin = model[0]
    delta = lin.parametrizations["weight"][0]
    merged_w = lin.parametrizations["weight"].original + delta.B @ delta.A * 2.0
    assert delta.B.abs().sum() > 0 and torch.equal(lin.quantized_weight(), lin.weight_quant(merged_w))
    out = model(x)
    assert merge_lora(model) == 2 and torch.equal(model(x), out) and type(model[0]).__name__ == "QuantLinear"


@pytest.mark.parametrize(
    "d,match",
    [({"rank": -1}, r"lora.rank: -1 is not valid; allowed: an integer >= 0"),
     ({"alpha": 0}, r"lora.alpha: 0 is not valid"), ({"rnak": 2}, r"lora.rnak: unknown field")],
)  # fmt: skip
def test_bad_config_is_one_line(d, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig.from_dict(d)


def test_a_target_matching_no_quantized_linear_is_an_error():
    with pytest.raises(ValueError, match=r"lora.targets: 'head' matches no quantized linear layer"):
        add_lora(_model(), LoRAConfig(rank=2, targets=["head"]))
