"""The types of ``qat-train`` and ``qat-mixed`` configs, registered as Hydra structured configs.

``train.yaml`` starts its defaults list with ``schema: train`` (``mixed.yaml`` overrides it with
``schema: mixed``), so every key named here overrides without ``+`` (``quant.fold_bn=true``,
``quant.weight.group_size=32``, ``distill.weight=0.5``), a value of the wrong type fails when the config is
composed, and a key that is not named is an error listing the allowed ones (:mod:`qat.cli._errors`).
Values and their comments live in the YAML files. The config dataclasses (:class:`qat.config.QuantConfig`,
:class:`qat.config.QuantSpec`, :class:`qat.train.distill.DistillConfig`) keep their defaults and every
rule; their schemas are derived from them by :func:`schema_of`. Groups whose files name a ``_target_``
(model, data, schedule, trainer, ...) are typed by that target's arguments when it is built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any

from qat.conf import node, register
from qat.config import QuantConfig, QuantSpec
from qat.quant.lora import LoRAConfig
from qat.train.distill import DistillConfig


@functools.cache
def schema_of(cls: type, **extra: tuple[Any, Any]) -> type:
    """A twin of a config dataclass that OmegaConf can type: its public fields and their defaults, a nested
    config dataclass as its own twin (default None: a spec written in YAML starts from the dataclass's
    defaults), a list or a dict as ``Any`` (a glob may be one string). ``extra``: ``name=(type, default)``."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        nested = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
        if nested:
            kind, default = schema_of(nested[0]) | None, None
        elif typing.get_origin(kind) in (list, dict):
            kind = Any
        fields.append((f.name, kind, field(default_factory=functools.partial(copy.deepcopy, default))))
    fields += [(name, kind, field(default=default)) for name, (kind, default) in extra.items()]
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


QuantSpecSchema = schema_of(QuantSpec)
QuantConfigSchema = schema_of(QuantConfig, name=(str | None, None))  # name: the config file's
DistillConfigSchema = schema_of(DistillConfig)
LoRAConfigSchema = schema_of(LoRAConfig)
Baseline = node("Baseline", max_epochs=int, lr=float | None, ckpt=str | None)
Calibration = node("Calibration", batches=int)
Export = node(
    "Export", enabled=bool, targets=list[str], max_batches=int | None, latency=list[int], repeats=int
)
Checkpoint = node("Checkpoint", every_n_train_steps=int, nonfinite_check_every_n_steps=int)
Paths = node("Paths", output_dir=str)
Optim = node("Optim", optimizer=Any, scale_lr_mult=float, scheduler=str, warmup_steps=int)
# The groups whose nodes name a `_target_` (typed by its arguments when it is built); a run may go without
# loggers or callbacks (`logger=null`).
GROUPS = {
    **dict.fromkeys(("model", "data", "schedule", "trainer"), Any),
    **dict.fromkeys(("logger", "callbacks"), (Any, None)),
}
# train.yaml: the job's own keys, and one node per config group.
Train = node(
    "Train", task=str, mode=str, seed=int, compile=bool, baseline=Baseline, calibration=Calibration,
    distill=DistillConfigSchema, lora=LoRAConfigSchema, export=Export, dry_run=bool, ckpt_path=str | None,
    resume=bool, checkpoint=Checkpoint, paths=Paths, quant=QuantConfigSchema, optim=Optim, **GROUPS,
)  # fmt: skip
# mixed.yaml: train.yaml plus the size budget and the search.
Budget = node("Budget", bits_per_weight=float)
MixedSearch = node(
    "MixedSearch", candidates=list[int], metric=str, batches=int, name=str | None, out=str | None
)
TRAIN = {f.name: (f.type, f.default) for f in dataclasses.fields(Train)}
Mixed = node("Mixed", **TRAIN, budget=Budget, mixed=MixedSearch)

register(__name__, train=Train, mixed=Mixed)
