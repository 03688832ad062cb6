"""Shared fixtures: compose the real Hydra config with tiny limits (no subprocess, no Hydra run dir)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from qat.cli.train import CONFIG_DIR


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``qat-train <overrides>`` would run, with paths.output_dir pointing at ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, sub: str = "run") -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / sub)

    return _make


def pytest_collection_modifyitems(config, items):
    """GPU tests skip (rather than fail) on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
