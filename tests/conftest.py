"""Shared fixtures: compose the real Hydra config with tiny limits (no subprocess, no Hydra run dir)."""

from __future__ import annotations

import os

import pytest
from helpers.configs import compose_cfg
from omegaconf import DictConfig


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, sub: str = "run") -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / sub)

    return _make


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip (rather than fail) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
