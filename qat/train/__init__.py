"""Training: the LightningModules, the QAT schedule callback and the main job.

Names are imported on first use, so that ``qat.train.distill`` (a config of the Hydra schema) does not load
Lightning.
"""

import importlib
from typing import Any

_HOMES = {"QATModule": "module", "TaskModule": "module", "param_groups": "module", "QATSchedule": "schedule"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'qat.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qat.train.{_HOMES[name]}"), name)
