"""QATModule: parameter groups (no weight decay on quantizer state), tasks, the distillation mix."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import qat
from qat.train.module import QATModule, param_groups


def _prepared():
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    return qat.prepare(
        m,
        {"weight": {"format": "int4", "granularity": "per_channel", "scale": "lsq"},
         "activation": {"format": "int8", "symmetric": False, "scale": "lsq"}},
    )  # fmt: skip


def test_quantizer_parameters_get_no_weight_decay_and_their_own_lr():
    m = _prepared()
    groups = {g["name"]: g for g in param_groups(m, weight_decay=0.1, lr=1e-3, scale_lr_mult=0.5)}
    quant_ids = {id(p) for _, q in qat.quantizers(m) for p in q.parameters()}
    assert {id(p) for p in groups["quant"]["params"]} == quant_ids and quant_ids
    assert groups["quant"]["weight_decay"] == 0.0 and groups["quant"]["lr"] == pytest.approx(5e-4)
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(m.parameters()))


def test_configure_optimizers_builds_groups_from_partial():
    factory = functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05)
    module = QATModule(_prepared(), optimizer=factory, scheduler="constant", scale_lr_mult=2.0, num_classes=4)
    opt = module.configure_optimizers()
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["quant"] == (pytest.approx(4e-3), 0.0) and lrs["decay"] == (pytest.approx(2e-3), 0.05)


def test_bad_task_and_scheduler_are_rejected():
    with pytest.raises(ValueError, match="task: 'regression' is not valid; allowed: classification, lm"):
        QATModule(nn.Linear(2, 2), task="regression")
    with pytest.raises(ValueError, match="optim.scheduler: 'step'"):
        QATModule(nn.Linear(2, 2), scheduler="step")


def test_training_step_with_teacher_mixes_losses():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = QATModule(student, num_classes=3)
    mixed = QATModule(student, teacher=teacher, distill={"weight": 1.0, "kind": "mse"}, num_classes=3)
    plain.log = mixed.log = lambda *a, **k: None  # no trainer attached
    task_loss = plain.training_step((x, y), 0)
    kd_only = mixed.training_step((x, y), 0)
    assert torch.allclose(kd_only, torch.nn.functional.mse_loss(student(x), teacher(x)))
    assert not torch.allclose(task_loss, kd_only)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher.") for k in mixed.state_dict())
