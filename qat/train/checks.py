"""The job's data step, before any training: the data loads, the model is built to fit it, one batch runs.

:func:`validate_data` turns what would fail minutes later, deep in a layer or after the float baseline has
trained (a missing file or split, a column that is not there, text shorter than one window, a model for
another kind of input, a class count that does not match), into one :class:`JobConfigError` line naming
what is wrong and what to set.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.calibrate import batch_inputs
from qat.tasks import TASKS, Output

log = logging.getLogger(__name__)

# Model fields that, left null in the model config, are taken from the datamodule's attribute of that name
# (in_features from the flattened ``input_shape``).
SIZES_FROM_DATA = ("in_features", "num_classes", "vocab_size", "pad_token_id")
# The model config that takes each kind of input, per task.
MODEL_FOR = {
    ("classification", "feature vectors"): "mlp",
    ("classification", "images"): "digits_cnn",
    ("classification", "token ids"): "text_classifier",
    ("lm", "token ids"): "tiny_gpt",
}
_EXAMPLES = {"data.data_files": "data.data_files=train.csv or 'data.data_files={train: a.csv, test: b.csv}'"}


class JobConfigError(ValueError):
    """A top-level job setting is invalid; the message names the key and the allowed values."""


def validate_data(cfg: DictConfig) -> tuple[Any, nn.Module]:
    """The datamodule with its splits loaded and the model built for it, checked on one training batch.

    Model fields in :data:`SIZES_FROM_DATA` left null are set from the data, in ``cfg.model`` itself, so
    ``config.yaml`` and the checkpoints rebuild the same model.
    """
    for group in ("data", "model"):
        for key in cfg[group]:
            if OmegaConf.is_missing(cfg[group], key):
                example = _EXAMPLES.get(f"{group}.{key}", f"{group}.{key}=<value>")
                raise JobConfigError(f"{group}.{key}: not set; add it to the command line, e.g. {example}")
    dm = _instantiate(cfg, "data")
    try:
        dm.setup()
        loader = dm.train_dataloader()
        dm.val_dataloader()  # built now so that a missing split fails now
        dm.test_dataloader()
        with torch.random.fork_rng(devices=[]):  # a loader draws a seed: keep the run's random stream as is
            batch = next(iter(loader), None)
    except Exception as e:
        raise JobConfigError(_message("data", cfg.data, e)) from e
    if batch is None:
        raise JobConfigError(f"data: the train split of {cfg.data._target_} is empty")
    fill_sizes_from_data(cfg, dm)
    model = _instantiate(cfg, "model")
    check_batch(cfg, model, dm, batch)
    return dm, model


def fill_sizes_from_data(cfg: DictConfig, dm: Any) -> None:
    """Set the model fields of :data:`SIZES_FROM_DATA` that are null from the datamodule."""
    shape = getattr(dm, "input_shape", None)
    sizes = {"in_features": math.prod(shape) if shape else None}
    sizes.update({key: getattr(dm, key, None) for key in SIZES_FROM_DATA[1:]})
    for key, value in sizes.items():
        if key not in cfg.model or cfg.model[key] is not None:
            continue
        if value is None:
            raise JobConfigError(
                f"model.{key}: null (taken from the data), but data {cfg.data._target_} gives no {key}; "
                f"allowed: an integer, e.g. model.{key}=10"
            )
        cfg.model[key] = int(value)
        log.info("model.%s=%d, from the data", key, int(value))


def check_batch(cfg: DictConfig, model: nn.Module, dm: Any, batch: Any) -> None:
    """Run one batch through ``model`` (eval mode, no gradients) and check its output against the data."""
    x = batch_inputs(batch)
    kind = "token ids" if not x.is_floating_point() else "images" if x.dim() == 4 else "feature vectors"
    name = _choice("model") or type(model).__name__
    given = f"{kind}, {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(x)
    except Exception as e:
        raise JobConfigError(
            f"model {name} cannot take the data's input ({given}): {_first_line(e)}{_hint(cfg, kind)}"
        ) from e
    finally:
        for m, training in modes.items():
            m.train(training)
    task = TASKS.get(str(cfg.task))  # an unknown task is validate()'s error
    if task is not None and task.output is not None:
        _check_output(cfg, name, out, task.output, getattr(dm, task.output.size, None))


def _check_output(cfg: DictConfig, name: str, out: Any, expected: Output, want: int | None) -> None:
    """The output has the task's dimensions and its last one is the data's ``want`` (classes, tokens)."""
    dims, key = expected.dims, expected.size
    if not isinstance(out, torch.Tensor) or out.dim() != dims:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise JobConfigError(
            f"model {name} gives {shape} for task={cfg.task}; allowed: a {dims}-D tensor of logits"
        )
    if want is not None and out.shape[-1] != want:
        fix = (
            f"model.{key}=null (taken from the data)" if key in cfg.model else f"the model's {key} to {want}"
        )
        raise JobConfigError(
            f"model {name} gives {out.shape[-1]} {expected.unit}, the data has {want}: set {fix}"
        )


def _hint(cfg: DictConfig, kind: str) -> str:
    """'; use model=...' for this task and input, unless that is the model already."""
    suggested = MODEL_FOR.get((str(cfg.task), kind))
    if suggested is None or suggested == _choice("model"):
        return ""
    hint = f"; use model={suggested}"
    if cfg.quant.get("overrides"):  # layer names of this model would match nothing in another one
        hint += " and a recipe that names no layers, e.g. recipe=generic_w4a8"
    return hint


def _choice(group: str) -> str | None:
    """The option chosen for a config group (``model=mlp`` -> ``mlp``), when Hydra is running."""
    if not HydraConfig.initialized():
        return None
    value = HydraConfig.get().runtime.choices.get(group)
    return None if value in (None, "null") else str(value)


def _instantiate(cfg: DictConfig, group: str) -> Any:
    try:
        return instantiate(cfg[group])
    except InstantiationException as e:
        raise JobConfigError(_message(group, cfg[group], e.__cause__ or e)) from e


def _message(group: str, node: DictConfig, error: BaseException) -> str:
    """One line: the error (and its cause) prefixed with the group and target unless it names its key."""
    text = _first_line(error)
    cause = error.__cause__
    if cause is not None and str(cause) not in text:
        text = f"{text}: {_first_line(cause)}"
    if text.startswith(f"{group}."):
        return text
    return f"{group} ({node.get('_target_')}): {text}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
