"""``qat-mixed``: automatic mixed-precision assignment, written as a reusable quant config.

Composes ``mixed.yaml`` (:mod:`qat.conf`: ``train.yaml`` + ``budget`` + ``mixed``): gets the float model
(trains the baseline like ``qat-train``, or loads ``baseline.ckpt``), measures per-layer sensitivity on
calibration batches, solves the width assignment for ``budget.bits_per_weight`` and writes ``<name>.yaml``
(a ``quant``-group file) and ``<name>_report.json`` (every sensitivity) next to it. Example::

    qat-mixed recipe=digits_w4a4 budget.bits_per_weight=3
    qat-train recipe=digits_w4a4 hydra.searchpath=[file://<run dir>] quant=mixed_w3
"""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.cli import train  # noqa: F401  (train.yaml's schema and run-name resolver: mixed.yaml extends it)
from qat.cli._app import run_app
from qat.cli._errors import HYDRA_VERBOSE_FLAG, exit_on_user_error, hydra_verbose
from qat.conf import CONFIG_PATH
from qat.config import QuantConfigError
from qat.io import write_json_atomic, write_text_atomic
from qat.mixed import auto_mixed, usage_hint, write_quant_config
from qat.train.checks import validate_data
from qat.train.job import (
    _load_weights,
    _module,
    build_trainer,
    quant_config,
    validate,
)

log = logging.getLogger("qat")


def _float_model(cfg: DictConfig, model: nn.Module, dm: Any, out: Path) -> nn.Module:
    """The float model the sensitivities are measured on: ``baseline.ckpt`` or a freshly trained baseline."""
    if cfg.baseline.ckpt:
        _load_weights(model, str(cfg.baseline.ckpt))
    if int(cfg.baseline.max_epochs) > 0:
        module = _module(cfg, model, dm, lr=cfg.baseline.lr)
        trainer = build_trainer(cfg, "float", out, [], max_epochs=int(cfg.baseline.max_epochs))
        trainer.fit(module, datamodule=dm)
    return model


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the assignment; returns the report that is also written to ``<name>_report.json``."""
    validate(cfg)
    base = quant_config(cfg)
    if base is None:
        raise QuantConfigError("quant: fp32 is not valid for qat-mixed; allowed: a config with int weights")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    dm, model = validate_data(cfg)  # data, model sizes taken from it, one batch: errors before training
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    model = _float_model(cfg, model, dm, out)
    dm.setup("fit")
    batches = list(islice(dm.calibration_dataloader(), int(cfg.mixed.batches)))
    bits = float(cfg.budget.bits_per_weight)
    result = auto_mixed(
        model,
        batches,
        base,
        bits,
        candidates=[int(b) for b in cfg.mixed.candidates],
        metric=str(cfg.mixed.metric),
        name=cfg.mixed.name,
    )
    name = str(result.config["name"])
    path = Path(cfg.mixed.out) if cfg.mixed.out else out / "quant" / f"{name}.yaml"
    write_quant_config(path, result)
    report = {
        "config_path": str(path),
        "budget_bits_per_weight": bits,
        "achieved_bits_per_weight": result.bits_per_weight,
        "predicted_damage": result.predicted_damage,
        "metric": str(cfg.mixed.metric),
        "bits": result.bits,
        "pinned": result.pinned,
        "sensitivity": {layer.name: {"params": layer.params, **layer.scores} for layer in result.layers},
    }
    write_json_atomic(path.with_name(f"{path.stem}_report.json"), report)
    print(result.table())
    print(f"\nwrote {path}\nuse: qat-train <recipe> {usage_hint(path)}")
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="mixed")
def _main(cfg: DictConfig) -> None:
    # A user error ends the command with one line and exit code 1 (hydra.verbose=true: the traceback too).
    with exit_on_user_error(hydra_verbose(), HYDRA_VERBOSE_FLAG):
        run(cfg)


def main() -> None:
    run_app(_main)


if __name__ == "__main__":
    main()
