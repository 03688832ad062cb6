"""Datamodules: all yield ``(inputs, targets)`` tuples and need no download at run time."""

from qat.data.digits import DigitsDataModule
from qat.data.hf import HFDataModule
from qat.data.pytext import PyTextDataModule

__all__ = ["DigitsDataModule", "HFDataModule", "PyTextDataModule"]
