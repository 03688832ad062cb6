"""``qat-train``: the Hydra app around :func:`qat.train.job.run`.

Configs live in the repository's ``configs/`` (recipes are reachable as the ``recipe`` group). Any invalid
value, missing path or unreadable data ends the run with a one-line message naming the key and the allowed
values (or the path) and exit code 1; ``hydra.verbose=true`` prints the traceback too. A failing run is
recorded as failed in its ``metrics.json``, so ``qat-report`` lists it; inside a sweep (``-m``) a failing
member returns no value instead of exiting (Optuna marks its trial failed), so the other members still
run. A non-finite training loss also ends the run with one line (the step and the last good checkpoint);
SIGTERM saves a checkpoint and exits with code 143, and ``resume=true`` continues the run
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from qat.cli._errors import HYDRA_VERBOSE_FLAG, exit_on_user_error, hydra_verbose, one_line
from qat.report.collect import record_failure
from qat.train.job import run
from qat.train.resume import find_resume_checkpoint

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def run_name(choices: Any) -> str:
    """The name of a run's directory: its recipe, or ``<data>_<quant>`` for a run without one."""
    recipe = choices.get("recipe")
    if recipe not in (None, "null"):
        return str(recipe)
    return f"{choices.get('data')}_{choices.get('quant')}"


OmegaConf.register_new_resolver("qat_run_name", run_name, replace=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
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
        ckpt = find_resume_checkpoint(cfg.paths.output_dir)
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
    if metrics.get("dry_run"):
        return 0.0  # a sweeper needs a number; nothing was measured
    # The returned value lets Hydra sweepers (e.g. optuna) optimise the primary metric; a metric that is
    # not a finite number returns no value (Optuna's sweeper stops on NaN, and marks a None trial failed).
    value = float(metrics["quantized"].get(metrics["primary_metric"], float("nan")))
    return value if math.isfinite(value) else None


def hydra_argv(argv: list[str]) -> list[str]:
    """``group=null`` on the command line (no recipe, no logger) deletes that group's default: Hydra spells
    it ``~group`` and stops with a traceback on ``group=null``."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    return [f"~{a[: -len('=null')]}" if a.endswith("=null") and a[:-5] in groups else a for a in argv]


def main() -> None:
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
