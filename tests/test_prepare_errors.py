"""A ``qat.prepare`` that fails leaves the model exactly as it was: the same module objects under the same
names, the same parameters and buffers, no report attached. Covers every error prepare raises against a
model's layers: include / exclude / override globs that match nothing, a group size that does not divide
one layer (the last one, so that every other layer was already built), attention hooks the model lacks,
and Conv-BN folding on a model without a foldable pair."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from qat.config import QuantConfigError
from qat.rewrite import prepare

W4 = {"format": "int4", "granularity": "per_channel", "scale": "lsq"}
A8 = {"format": "int8", "scale": "ema"}
G8 = {"format": "int4", "granularity": "per_group", "group_size": 8}


class Net(nn.Module):
    """Conv + BN, nested linears; ``head`` (input 12) is the only linear a group of 8 does not divide.
    ``foldable=False``: a BN without running statistics, which Conv-BN folding cannot fold."""

    def __init__(self, foldable: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=foldable)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.head(self.body(h))


# case: (config, start of the error message, model with a foldable conv-BN pair)
CASES = {
    "include glob matches nothing": (
        {"weight": W4, "include": ["body.*", "decoder.*"]},
        "quant.include: 'decoder.*' matches no quantizable layer",
        True,
    ),
    "exclude glob matches nothing": (
        {"weight": W4, "exclude": ["haed"]},
        "quant.exclude: 'haed' matches no quantizable layer",
        True,
    ),
    "override glob matches nothing": (
        {"weight": W4, "overrides": {"lm_head": {"weight": {"format": "int8"}}}},
        "quant.overrides: 'lm_head' matches no quantizable layer",
        True,
    ),
    "group size does not divide the last layer": (
        {"weight": G8, "exclude": ["conv"]},  # conv's input dimension 2 would fail first
        "quant.weight.group_size: 8 does not divide the input dimension 12 of layer 'head'",
        True,
    ),
    "attention hooks missing": (
        {"weight": W4, "activation": A8, "attention": A8},
        "quant.attention: the model exposes no attention hook points",
        True,
    ),
    "fold_bn with nothing foldable": (
        {"weight": W4, "fold_bn": True},
        "quant.fold_bn: true is not valid for this model",
        False,
    ),
}


def _snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return modules, state


@pytest.mark.parametrize("case", list(CASES))
def test_failed_prepare_leaves_the_model_unchanged(case: str) -> None:
    cfg, message, foldable = CASES[case]
    torch.manual_seed(0)
    model = Net(foldable)
    model(torch.randn(4, 2, 3, 3))  # BN running statistics that differ from their initial values
    modules, state = _snapshot(model)
    with pytest.raises(QuantConfigError, match="^" + re.escape(message)):
        prepare(model, cfg, example_inputs=torch.randn(2, 2, 3, 3))
    after = dict(model.named_modules())
    assert list(after) == list(modules)
    assert all(after[name] is mod for name, mod in modules.items())
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert not hasattr(model, "qat_report") and not hasattr(model, "qat_config")
