"""Every config group option and every recipe composes, and its leaf objects instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat.cli.train import CONFIG_DIR
from qat.config import QuantConfig
from qat.train.job import quant_config, validate

RECIPES = sorted(p.stem for p in (Path(CONFIG_DIR).parent / "recipes").glob("*.yaml"))
GROUPS = ["model", "data", "quant", "optim", "schedule", "trainer", "logger", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(make_cfg, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "hf":
        overrides.append("data.data_files=unused.csv")
    cfg = make_cfg(*overrides)
    OmegaConf.resolve(cfg)
    if group == "quant":
        q = quant_config(cfg)
        assert q is None or isinstance(q, QuantConfig)
    if group in ("schedule", "optim"):
        instantiate(cfg[group] if group == "schedule" else cfg.optim.optimizer)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(make_cfg, recipe):
    cfg = make_cfg(f"recipe={recipe}")
    OmegaConf.resolve(cfg)
    validate(cfg)
    if not recipe.startswith("sweep"):
        instantiate(cfg.model)


def test_default_recipe_is_digits_w4a4(make_cfg):
    cfg = make_cfg()
    assert cfg.quant.name == "w4a4" and cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.quant.overrides.conv1.weight.format == "int8"


def test_command_line_group_override_beats_recipe(make_cfg):
    cfg = make_cfg("quant=w2a2", "trainer.max_epochs=3")
    assert cfg.quant.name == "w2a2" and cfg.trainer.max_epochs == 3
