"""``compile: true``: training steps run the model through ``torch.compile`` and compute the eager step (loss
and every gradient, within float tolerance); evaluation and the state dict stay those of the eager model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers.configs import compose_cfg
from torch import nn

import qat
from qat.train.job import _module
from qat.train.module import QATModule


def _model() -> nn.Module:
    """The GPT scheme on a tiny MLP: W4 group-32 LSQ weights, int8 dynamic per-token inputs."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    return qat.prepare(
        m,
        {"weight": {"format": "int4", "granularity": "per_group", "group_size": 32, "scale": "lsq"},
         "activation": {"format": "int8", "granularity": "per_token", "symmetric": False, "dynamic": True}},
    )  # fmt: skip


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, 64, generator=g), torch.randint(0, 10, (2, 8), generator=g)


def _step(module: QATModule) -> list[torch.Tensor]:
    x, y = _batch()
    module.train()
    loss = nn.functional.cross_entropy(module.run_model(x).reshape(-1, 10), y.reshape(-1))
    loss.backward()
    return [loss.detach(), *(p.grad for p in module.model.parameters())]


def test_compiled_training_step_is_the_eager_step() -> None:
    model = _model()
    qat.calibrate(model, [_batch()], num_batches=1)  # learned scales initialised, as the job does
    eager, compiled = QATModule(copy.deepcopy(model)), QATModule(copy.deepcopy(model), compile=True)
    torch._dynamo.reset()
    try:
        got, expected = _step(compiled), _step(eager)
    finally:
        torch._dynamo.reset()
    assert len(got) == len(expected) == 1 + len(list(model.parameters()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # the wrapper is not a submodule


def test_compile_switch_reaches_the_module_and_evaluation_stays_eager(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_compile(model, **kw):
        def run(*args):
            calls.append(kw)
            return model(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = compose_cfg(["compile=true"], tmp_path)
    module = _module(cfg, _model(), SimpleNamespace(num_classes=10))
    x = _batch()[0]
    module.eval()
    module.run_model(x)
    assert calls == []
    module.train()
    module.run_model(x)
    assert calls == [{"options": qat.quant.quantizer.COMPILE_OPTIONS}]
    assert _module(compose_cfg([], tmp_path), _model(), SimpleNamespace()).__dict__["_compiled"] is None


@pytest.mark.slow
def test_lightning_fits_a_compiled_qat_model() -> None:
    model = _model()
    qat.calibrate(model, [_batch()], num_batches=1)
    module = QATModule(model, compile=True, scheduler="constant", num_classes=10, task="lm")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_batch()), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    before = copy.deepcopy(model.state_dict())
    try:
        trainer.fit(module, train_dataloaders=data)
    finally:
        torch._dynamo.reset()
    assert trainer.global_step == 3
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
