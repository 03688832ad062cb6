"""Fixtures for the export tests: small trained models on digits and pytext, built once per session
(the helpers that build them are in ``tests/helpers/export_models.py``).

Models are trained briefly (a fraction of a second to a few seconds on CPU) so scales, logit ranges and
activations look like a real run's, then prepared, calibrated and fine-tuned with fake quant for a few
steps: learned scales move away from their initial values, which is what an export must capture.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from helpers.export_models import Data, tiny_gpt, torch_threads, train
from torch import nn

from qat.data import DigitsDataModule, PyTextDataModule
from qat.models import DigitsCNN


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits() -> Data:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return Data(list(dm.train_dataloader()), list(dm.calibration_dataloader())[:4], list(dm.val_dataloader()),
                "classification")  # fmt: skip


@pytest.fixture(scope="session")
def digits_float(digits: Data) -> nn.Module:
    torch.manual_seed(0)
    with torch_threads(1):
        return train(DigitsCNN(), digits.train, steps=200, lr=1e-2, task="classification")


@pytest.fixture(scope="session")
def pytext() -> Data:
    torch.manual_seed(0)
    dm = PyTextDataModule(seq_len=32, batch_size=16, max_files=40, max_bytes=120_000)
    dm.setup()
    val = list(itertools.islice(dm.val_dataloader(), 6))
    train_b = list(itertools.islice(dm.train_dataloader(), 40))
    return Data(train_b, train_b[:4], val, "lm")


@pytest.fixture(scope="session")
def gpt_float(pytext: Data) -> nn.Module:
    torch.manual_seed(0)
    with torch_threads(1):
        return train(tiny_gpt(), pytext.train, steps=60, lr=3e-3, task="lm")
