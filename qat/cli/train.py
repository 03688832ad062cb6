"""``qat-train``: the Hydra app around :func:`qat.train.job.run`.

Configs ship in the package (:mod:`qat.conf`; recipes are the ``recipe`` group), typed by
:mod:`qat.conf.schema`. Any unknown key, invalid value, missing path or unreadable data ends the run with a
one-line message naming the key and the allowed keys or values (or the path) and exit code 1;
``hydra.verbose=true`` prints the traceback too. A failing run is
recorded as failed in its ``metrics.json``, so ``qat-report`` lists it; inside a sweep (``-m``) a failing
member returns no value instead of exiting (Optuna marks its trial failed), so the other members still
run. The value returned to a sweeper (Optuna) is the primary metric on the validation split, so a search
never sees the test split. A non-finite training loss also ends the run with one line (the step and the
last good checkpoint); SIGTERM saves a checkpoint and exits with code 143, and ``resume=true`` continues
the run (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import qat.conf.schema  # noqa: F401  (registers the config schemas)
from qat.cli._app import run_app
from qat.cli._errors import HYDRA_VERBOSE_FLAG, exit_on_user_error, hydra_verbose, one_line
from qat.conf import CONFIG_DIR as CONFIG_DIR  # composing train.yaml needs this module imported
from qat.conf import CONFIG_PATH
from qat.report.collect import record_failure
from qat.runs import latest_checkpoint
from qat.train.job import run


def run_name(choices: Any) -> str:
    """The name of a run's directory: its recipe, or ``<data>_<quant>`` for a run without one."""
    recipe = choices.get("recipe")
    if recipe not in (None, "null"):
        return str(recipe)
    return f"{choices.get('data')}_{choices.get('quant')}"


OmegaConf.register_new_resolver("qat_run_name", run_name, replace=True)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    # A user error ends a single run with one line and exit code 1 (hydra.verbose=true: the traceback too).
    with exit_on_user_error(hydra_verbose(), HYDRA_VERBOSE_FLAG):
        return _run(cfg)


def _run(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except SIGTERMException:
        # Lightning stopped after the current batch and SigtermCheckpoint saved it: say how to continue, and
        # exit with the code of a SIGTERM death (128 + 15) so schedulers see an interrupted, not a done, job.
        ckpt = latest_checkpoint(cfg.paths.output_dir)
        print(
            f"interrupted by SIGTERM; checkpoint: {ckpt}; continue with the same command plus "
            f"resume=true hydra.run.dir={cfg.paths.output_dir}",
            file=sys.stderr,
        )
        sys.exit(143)
    except Exception as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            path = record_failure(cfg.paths.output_dir, e, cfg)
            logging.getLogger("qat").exception("run failed, recorded in %s; the sweep goes on", path)
            print(f"error: {one_line(e, HYDRA_VERBOSE_FLAG)} (recorded in {path})", file=sys.stderr)
            return None
        with contextlib.suppress(OSError):  # qat-report lists the run as failed (not as still running)
            record_failure(cfg.paths.output_dir, e, cfg)
        logging.getLogger("qat").error("%s", e)  # the run's log file keeps it too
        raise
    return objective(metrics)


def objective(metrics: dict[str, Any]) -> float | None:
    """What a run returns to a Hydra sweeper (Optuna): the final model's primary metric on the validation
    split (``val_<metric>``, :func:`qat.train.job.evaluate`), so a search never selects on the test split;
    None when it is not a finite number (Optuna's sweeper stops on NaN, and marks a None trial failed)."""
    if metrics.get("dry_run"):
        return 0.0  # a sweeper needs a number; nothing was measured
    value = float(metrics["quantized"].get(f"val_{metrics['primary_metric']}", float("nan")))
    return value if math.isfinite(value) else None


def main() -> None:
    run_app(_main)


if __name__ == "__main__":
    main()
