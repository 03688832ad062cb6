"""The commands' Hydra configs, shipped inside the package and found as ``pkg://qat.conf``.

``train.yaml`` (``qat-train``) and ``mixed.yaml`` (``qat-mixed``) over the groups ``model/ data/ quant/
optim/ schedule/ trainer/ logger/ callbacks/ debug/ hparams_search/`` and ``recipe/`` (ready experiments);
``export.yaml`` and ``eval.yaml`` hold the keys of ``qat-export`` and ``qat-eval``. Each file's keys are typed
by a schema (:mod:`qat.conf.schema`; the tools' own in their modules, which import no training code).
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CONFIG_DIR = str(Path(__file__).parent)
CONFIG_PATH = "pkg://qat.conf"


def quant_preset(name: str) -> dict[str, Any]:
    """The packaged quant config ``quant/<name>.yaml`` (what ``qat-train quant=<name>`` uses) as a dict."""
    from omegaconf import OmegaConf

    from qat.config import QuantConfigError

    path = Path(CONFIG_DIR) / "quant" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise QuantConfigError(f"quant: {name!r} is not a packaged quant config; allowed: {', '.join(names)}")
    cfg: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]
    cfg.pop("name", None)  # the preset's label, not a field
    return cfg


def node(name: str, /, **types: Any) -> type:
    """The schema of a config node: its keys and their types. A key is missing (``???``) until a config
    file sets it, so the values (and their comments) live in the YAML files only; a key whose type is
    itself a node starts as that node, empty; ``key=(type, default)`` gives a default."""
    fields = []
    for key, kind in types.items():
        kind, default = kind if isinstance(kind, tuple) else (kind, MISSING)
        empty = dataclasses.is_dataclass(kind)
        spec = dataclasses.field(default_factory=kind) if empty else dataclasses.field(default=default)
        fields.append((key, kind, spec))
    return dataclasses.make_dataclass(name, fields)


def register(module: str, **schemas: type) -> None:
    """Store each ``name=dataclass`` as option ``name`` of the ``schema`` group, at the config's root: a
    config file's defaults list names it first (``schema: train``). The dataclasses that ``module`` made
    with :func:`node` or :func:`dataclasses.make_dataclass` and binds under their own names are given its
    name, so that a pickled config (the submitit launcher) refers to them instead of copying them."""
    for key, value in vars(sys.modules[module]).items():
        if isinstance(value, type) and value.__module__ == "types" and value.__qualname__ == key:
            value.__module__ = module
    for name, schema in schemas.items():
        ConfigStore.instance().store(group="schema", name=name, node=schema, package="_global_")
