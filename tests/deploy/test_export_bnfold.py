"""A model trained with Conv-BN folding exports to files that load into a fresh instance of the user's own
float class: ``quant_config.json`` names the BatchNorm folded into each conv, which becomes an identity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qat
from qat.deploy import schema
from qat.deploy.loader import _drop_folded_bn
from qat.quant.modules import deployed

W8 = {"format": "int8", "granularity": "per_channel"}
A8 = {"format": "int8", "symmetric": False, "scale": "ema"}


class _Block(nn.Module):
    """Convs without bias (a BN follows each); BNs defined after both convs, as some models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = _Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block1(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def prepared() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = _Net().train()
    with torch.no_grad():  # running statistics away from a fresh BN's
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 1)
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    cfg = {"weight": W8, "activation": A8, "fold_bn": True}
    q = qat.prepare(model.eval(), cfg, example_inputs=batches[0][0])
    qat.calibrate(q, batches)
    return q.eval(), batches


@pytest.mark.parametrize("fold_first", [False, True], ids=["prepared", "fold_bn-copy"])
def test_folded_export_loads_into_the_original_class(prepared, tmp_path, fold_first: bool) -> None:
    q, batches = prepared
    qat.export(
        deployed(copy.deepcopy(q)) if fold_first else q,
        tmp_path / "e",
        batches=batches,
        task="classification",
    )
    layers = json.loads((tmp_path / "e" / schema.CONFIG_FILE).read_text())["layers"]
    folded = {n: layer["folded_bn"] for n, layer in layers.items() if layer.get("folded_bn")}
    assert folded == {"block1.conv1": "block1.bn1", "block1.conv2": "block1.bn2"}
    x = batches[0][0]
    for skeleton in (_Net(), qat.unprepare(deployed(copy.deepcopy(q)))):  # the user's class; already folded
        runtime = qat.load_quantized(tmp_path / "e", skeleton)
        assert isinstance(runtime.block1.bn1, nn.Identity) and isinstance(runtime.block1.bn2, nn.Identity)
        with torch.no_grad():
            assert torch.allclose(runtime(x), q(x), atol=1e-5)


def test_older_export_without_bn_names_pairs_by_the_forward() -> None:
    """``folded_bn: true`` (exports written before the name was stored): the BN each conv feeds."""
    model = _Net()
    _drop_folded_bn(
        model, {"layers": {"block1.conv1": {"folded_bn": True}, "block1.conv2": {"folded_bn": True}}}
    )
    assert isinstance(model.block1.bn1, nn.Identity) and isinstance(model.block1.bn2, nn.Identity)


def test_folded_bn_naming_another_layer_is_refused_before_anything_changes() -> None:
    model = _Net()
    bad = {"layers": {"block1.conv1": {"folded_bn": "block1.bn1"}, "block1.conv2": {"folded_bn": "head"}}}
    with pytest.raises(schema.ExportFormatError, match=r"folded_bn names 'head', which is a Linear"):
        _drop_folded_bn(model, bad)
    assert isinstance(model.block1.bn1, nn.BatchNorm2d)
