"""``qat-train``: the Hydra app around :func:`qat.train.job.run`.

Configs live in the repository's ``configs/`` (recipes are reachable as the ``recipe`` group). Any invalid
value ends the run with a one-line message naming the key and the allowed values and exit code 1. Inside a
sweep (``-m``) a failing member is recorded as failed in its ``metrics.json`` and returns NaN instead, so
the other members still run and ``qat-report`` lists it. A non-finite training loss also ends the run with
one line (the step and the last good checkpoint); SIGTERM saves a checkpoint and exits with code 143, and
``resume=true`` continues the run (docs/reliability.md).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from qat.config import QuantConfigError
from qat.report.collect import record_failure
from qat.train.job import JobConfigError, run
from qat.train.module import NonFiniteLossError
from qat.train.resume import find_resume_checkpoint

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
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
            print(f"error: {e} (recorded in {path})", file=sys.stderr)
            return float("nan")
        if not isinstance(e, (QuantConfigError, JobConfigError, NonFiniteLossError)):
            raise
        logging.getLogger("qat").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # The returned value lets Hydra sweepers (e.g. optuna) optimise the primary metric.
    return float(metrics["quantized"].get(metrics["primary_metric"], float("nan")))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
