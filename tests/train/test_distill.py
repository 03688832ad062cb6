"""The ``distill`` config (checked against the task) and the distillation losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat.train.checks import JobConfigError
from qat.train.distill import DistillConfig, distillation_loss, embedding_loss, hidden_state_loss


def test_config_takes_the_task_defaults_and_checks_keys_kinds_and_ranges():
    assert DistillConfig.from_dict(None, "classification") == DistillConfig(kind="kl")
    assert DistillConfig.from_dict(None, "embed_distill").kind == "cosine"
    cfg = DistillConfig.from_dict({"weight": 0.5, "kind": "mse", "temperature": 2}, "lm")
    assert (cfg.weight, cfg.kind, cfg.temperature) == (0.5, "mse", 2.0)
    # What a structured config holds: every field, those the task does not read at their defaults.
    full = {"weight": 0.0, "kind": "cosine", "temperature": 1.0, "hidden_weight": 1.0}
    assert DistillConfig.from_dict(full, "embed_distill").hidden_weight == 1.0
    assert DistillConfig.from_dict(cfg, "classification") == cfg
    with pytest.raises(
        JobConfigError, match=r"^distill.wieght: unknown field; allowed for lm: weight, kind, "
    ):
        DistillConfig.from_dict({"wieght": 0.5}, "lm")
    with pytest.raises(
        JobConfigError, match="distill.hidden_weight: unknown field; allowed for classification"
    ):
        DistillConfig.from_dict({"hidden_weight": 1.0}, "classification")
    with pytest.raises(JobConfigError, match=r"^distill.kind: 'kld' is not valid; allowed: kl, mse$"):
        DistillConfig.from_dict({"kind": "kld"}, "classification")
    with pytest.raises(JobConfigError, match=r"^distill.kind: 'kl' is not valid; allowed: cosine, mse$"):
        DistillConfig.from_dict({"kind": "kl"}, "embed_distill")
    with pytest.raises(JobConfigError, match=r"^distill.weight: 1.5 is not valid; allowed: 0 <= value <= 1$"):
        DistillConfig.from_dict({"weight": 1.5}, "classification")
    with pytest.raises(
        JobConfigError, match=r"^distill.temperature: 'hot' is not valid; allowed: a number > 0$"
    ):
        DistillConfig.from_dict({"temperature": "hot"}, "classification")
    with pytest.raises(JobConfigError, match=r"^distill: 0.5 is not valid; allowed: a mapping"):
        DistillConfig.from_dict(0.5, "classification")  # type: ignore[arg-type]


def test_job_rejects_a_bad_distill_before_training(make_cfg):
    from qat.train.job import validate

    with pytest.raises(JobConfigError, match="distill.kind: 'cosine' is not valid; allowed: kl, mse"):
        validate(make_cfg("recipe=digits_distill", "distill.kind=cosine"))


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 10)
    assert distillation_loss(a, a, "kl", 2.0).abs() < 1e-6
    assert distillation_loss(a, a + torch.randn(4, 10), "kl", 2.0) > 0
    assert distillation_loss(a, a + 1.0, "mse", 1.0) == pytest.approx(1.0)


def test_embedding_losses():
    t = F.normalize(torch.randn(4, 8), dim=-1)
    assert float(embedding_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_loss(-t, t, "cosine")) == pytest.approx(2.0)
    assert float(embedding_loss(-t, t, "mse")) == pytest.approx(4.0)  # |s - t|^2 of opposite unit vectors


def test_hidden_state_loss_ignores_padding():
    mask = torch.tensor([[1, 1, 0]])
    h = torch.randn(1, 3, 4)
    other = h.clone()
    other[0, 2] += 5.0  # differs only at the padded position
    assert float(hidden_state_loss((h,), (other,), mask)) == 0.0
    other[0, 0] += 1.0
    assert float(hidden_state_loss((h,), (other,), mask)) == pytest.approx(4.0 / 8)  # 4 dims off by 1
