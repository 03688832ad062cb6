"""``qat-train``: the Hydra app around :func:`qat.train.job.run`.

Configs live in the repository's ``configs/`` (recipes are reachable as the ``recipe`` group). Any invalid
value ends the run with a one-line message naming the key and the allowed values and exit code 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qat.config import QuantConfigError
from qat.train.job import JobConfigError, run

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except (QuantConfigError, JobConfigError) as e:
        logging.getLogger("qat").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # The returned value lets Hydra sweepers (e.g. optuna) optimise the primary metric.
    return float(metrics["quantized"].get(metrics["primary_metric"], float("nan")))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
