"""The task registry: every entry names a module that trains it and logs its metric; a task is one entry."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import get_class
from torch import nn

from qat.tasks import TASKS, Output, Task, cross_entropy
from qat.train.module import QATModule, TaskModule


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_names_a_module_that_logs_its_primary_metric(name):
    task = TASKS[name]
    cls = get_class(task.module)
    assert issubclass(cls, TaskModule)
    model = nn.Linear(4, 3)
    module = cls(model, task=name, teacher=copy.deepcopy(model))
    assert module.task is task and set(module.metrics) == {"val", "test"}
    assert task.metric in module.metrics["val"] and task.metric in module.metrics["test"]
    assert task.distill_kinds and set(task.distill_fields) <= {
        "weight",
        "kind",
        "temperature",
        "hidden_weight",
    }


def test_a_module_rejects_the_tasks_of_another_module():
    with pytest.raises(ValueError, match="task: 'embed_distill' is not valid; allowed: classification, lm"):
        QATModule(nn.Linear(2, 2), task="embed_distill")


def test_causal_lm_distillation_is_one_registry_entry(monkeypatch):
    """The shape the LLM issue's task takes: next-token logits distilled from the float model."""
    entry = Task(
        module="qat.train.module.QATModule", loss=cross_entropy, metric="ppl", higher_is_better=False,
        verify="perplexity", output=Output(3, "vocab_size", "tokens"), self_distill=True,
    )  # fmt: skip
    monkeypatch.setitem(TASKS, "lm_distill", entry)
    torch.manual_seed(0)
    student, teacher = nn.Embedding(16, 16), nn.Embedding(16, 16)
    with pytest.raises(ValueError, match="task lm_distill needs a teacher"):
        QATModule(student, task="lm_distill")
    module = QATModule(student, task="lm_distill", teacher=teacher, distill={"weight": 1.0})
    module.log = lambda *a, **k: None  # no trainer attached
    ids = torch.randint(0, 16, (2, 5))
    loss = module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    s, t = (m(ids[:, :-1]).log_softmax(-1).flatten(0, 1) for m in (student, teacher))
    kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    assert torch.allclose(loss, kl)
    assert list(module.metrics["val"]) == ["ppl"]
