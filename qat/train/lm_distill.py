"""Task ``causal_lm``: a quantized pretrained causal LM learns its own float next-token distributions.

The teacher is the float model as loaded (the baseline: no float training), the student its prepared copy.
Loss = (1 - w) · cross-entropy on the data + w · KL(teacher || student) per token, w = ``distill.weight``
(Gemma 3's and NVIDIA's QAD recipe is w = 1, pure distillation). Metric: perplexity (``ppl``).

The teacher's logits are computed on the fly, or, with ``teacher_cache`` set (a folder; a data config key,
as the cache belongs to the data's windows), its top ``teacher_topk`` logits of each position are read from
disk, written on first use: one file per batch, named after the batch's token ids, so runs on the same data
and teacher (full QAT, QAT-LoRA, other formats) share it. The cached loss is the cross-entropy of the
student to the teacher's top-k distribution (renormalised): the KL up to the teacher's entropy, a constant.
Memory knobs: ``trainer.precision=bf16-mixed`` (autocast; weights stay fp32) and the model's
``gradient_checkpointing``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from qat.deploy.verify import logits_of
from qat.io import write_bytes_atomic
from qat.train.distill import distillation_loss
from qat.train.module import METRICS, TaskModule


class TeacherCache:
    """The teacher's top-``k`` next-token logits per batch of token ids, in ``folder`` (fp16 values, int32
    indices). ``key`` also names the teacher and ``k``, so two teachers never share files."""

    def __init__(self, folder: str | Path, k: int) -> None:
        self.folder, self.k = Path(folder), int(k)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, ids: torch.Tensor, teacher: nn.Module) -> Path:
        h = hashlib.sha1(ids.cpu().numpy().tobytes())
        h.update(f"{getattr(teacher, 'name_or_path', type(teacher).__name__)}/{self.k}".encode())
        return self.folder / f"{h.hexdigest()}.pt"

    def topk(self, ids: torch.Tensor, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [B, T, k] float32, indices [B, T, k] int64)`` of the teacher's logits for ``ids``."""
        path = self.path(ids, teacher)
        if path.is_file():
            v, i = torch.load(path, weights_only=True)
            return v.float().to(ids.device), i.long().to(ids.device)
        with torch.no_grad():
            v, i = logits_of(teacher(ids)).float().topk(self.k, dim=-1)
        buf = io.BytesIO()
        torch.save((v.half().cpu(), i.int().cpu()), buf)
        write_bytes_atomic(path, buf.getvalue())
        return v, i


def topk_distillation_loss(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                           temperature: float) -> torch.Tensor:  # fmt: skip
    """Mean over positions of the cross-entropy of ``student`` logits to the teacher's top-k distribution
    (``values`` at ``index``, renormalised), at ``temperature`` (scaled by T^2 like the full KL)."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, index)
    q = F.softmax(values / temperature, dim=-1)
    return -(q * log_p).sum(-1).mean() * temperature**2


class CausalLMModule(TaskModule):
    """Trains a Hugging Face causal LM (``model(ids).logits``) on ``(inputs, targets)`` token windows,
    distilled from the frozen float ``teacher`` (``distill.weight``). ``teacher_cache`` / ``teacher_topk``:
    see the module docstring (from the datamodule); ``kw``: the arguments of :class:`TaskModule`."""

    default_lr = 1e-5

    def __init__(self, model: nn.Module, task: str = "causal_lm", teacher_cache: str | None = None,
                 teacher_topk: int = 64, **kw: Any) -> None:  # fmt: skip
        super().__init__(model, task, **kw)
        self.cache = TeacherCache(teacher_cache, teacher_topk) if teacher_cache else None

    @classmethod
    def data_kwargs(cls, datamodule: Any) -> dict[str, Any]:
        keys = ("teacher_cache", "teacher_topk")
        return {k: getattr(datamodule, k) for k in keys if hasattr(datamodule, k)}

    def build_metrics(self) -> dict[str, torchmetrics.Metric]:
        return {self.task.metric: METRICS[self.task.metric](0)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(ids))

    def train_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = logits_of(self.run_model(x))
        w, d = self.distill.weight, self.distill
        ce = self.task.loss(logits, y) if w < 1 else logits.new_zeros(())
        if self.teacher is None or w <= 0:
            return ce, {}
        if self.cache is not None:
            values, index = self.cache.topk(x, self.teacher)
            kd = topk_distillation_loss(logits, values, index, d.temperature)
        else:
            with torch.no_grad():
                t_logits = logits_of(self.teacher(x))
            kd = distillation_loss(logits, t_logits, str(d.kind), d.temperature)
        return (1 - w) * ce + w * kd, {"distill": kd, "ce": ce}

    def eval_loss(self, batch: Any, metrics: nn.ModuleDict) -> torch.Tensor:
        x, y = batch
        logits = logits_of(self.model(x))
        metrics[self.task.metric].update(logits.float(), y)
        return self.task.loss(logits, y)
