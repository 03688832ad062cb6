"""``qat-export``: export a finished run (or one of its checkpoints) to integer weights, verified.

    qat-export run_dir=outputs/digits_w4a4/2026-01-01_00-00-00            # -> <run_dir>/export
    qat-export ckpt=outputs/.../checkpoints/qat/last.ckpt target=onnx out=/tmp/exp

Keys (``export.yaml``): ``run_dir`` or ``ckpt`` (a checkpoint inside a run directory), ``out`` (default
``<run_dir>/export``), ``target`` (one name or a list of :data:`qat.deploy.registry.TARGETS`: native,
the integer export, is always written; onnx adds a QDQ ``model.onnx``, gguf a llama.cpp ``model.gguf``,
compressed-tensors a transformers / vLLM directory), ``verify`` (true:
compare the reloaded model with the fake-quant one on the validation split and fail on a mismatch),
``max_batches``, ``split``, ``verbose`` (true: print the traceback of an error before its one-line message).
Exit codes: 0 written, 1 bad arguments, run directory or output path, 2 verification failed (nothing
written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

from qat.cli._app import run_app
from qat.conf import CONFIG_PATH, node, register

# The types of export.yaml's keys.
Export = node(
    "Export", run_dir=str | None, ckpt=str | None, out=str | None, target=Any, verify=bool, max_batches=int,
    split=str, verbose=bool,
)  # fmt: skip
register(__name__, export=Export)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _main(cfg: DictConfig) -> None:
    from qat.cli._errors import exit_on_user_error
    from qat.deploy import VerificationError

    with exit_on_user_error(cfg.verbose, "verbose=true", codes={VerificationError: 2}):
        report = _export(cfg)
    print(report.summary())


def main(argv: Sequence[str] | None = None) -> None:
    run_app(_main, argv)


def _export(cfg: DictConfig) -> Any:
    from qat.calibrate import batch_inputs
    from qat.cli._errors import check_choice
    from qat.deploy import export
    from qat.deploy.registry import TARGETS
    from qat.runs import SPLITS, export_dir, load_run

    names = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target)
    for name in names:
        check_choice("target", name, list(TARGETS))
    check_choice("split", cfg.split, SPLITS)
    run = load_run(cfg.run_dir, checkpoint=cfg.ckpt)
    batches = run.batches(cfg.split, cfg.max_batches) if cfg.verify else None
    return export(
        run.model, cfg.out or export_dir(run.path), batches=batches, task=run.task, targets=names,
        verify=cfg.verify, example_input=None if batches else batch_inputs(run.batches("validation", 1)[0]),
        tokenizer=run.tokenizer,
    )  # fmt: skip


if __name__ == "__main__":
    main()
