"""Small trained models for the export tests: quant configs by name, a few training steps, QAT copies.

Models are trained briefly (a fraction of a second to a few seconds on CPU) so scales, logit ranges and
activations look like a real run's, then prepared, calibrated and fine-tuned with fake quant for a few
steps: learned scales move away from their initial values, which is what an export must capture.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.conf import CONFIG_DIR
from qat.conf import quant_preset as quant_cfg  # noqa: F401  (re-exported: the tests import it from here)
from qat.models import TinyGPT

QUANT_DIR = Path(CONFIG_DIR) / "quant"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """These models are tiny: one intra-op thread is fastest, and on a busy machine two threads spinning
    on each other cost 10-20x the CPU time (measured: 50 DigitsCNN steps 0.23 s vs 4.5 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(model: nn.Module, batches: list[Any], steps: int, lr: float, task: str) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in itertools.islice(itertools.cycle(batches), steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class Data:
    def __init__(self, train: list[Any], cal: list[Any], val: list[Any], task: str) -> None:
        self.train, self.cal, self.val, self.task = train, cal, val, task


def tiny_gpt(**kw: Any) -> TinyGPT:
    return TinyGPT(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=2, **kw)


def prepared_export(model: nn.Module, cfg: Any, batches: list[Any], out: Path) -> tuple[nn.Module, Any]:
    """``model`` prepared with ``cfg`` and calibrated on ``batches``, exported to ``out`` verified on the
    same batches: ``(prepared model in eval mode, export report)``."""
    model = qat.prepare(model, cfg)
    qat.calibrate(model, batches)
    report = qat.export(model.eval(), out, batches=batches)
    return model, report


def quantize(float_model: nn.Module, cfg: dict[str, Any], data: Data, qat_steps: int = 10) -> nn.Module:
    """Prepared copy of ``float_model``: calibrated, then a few QAT steps (learned scales move)."""
    torch.manual_seed(1)
    m = qat.prepare(copy.deepcopy(float_model), cfg)
    qat.calibrate(m, data.cal)
    if qat_steps:
        train(m, data.train, steps=qat_steps, lr=1e-3, task=data.task)
    return m.eval()
