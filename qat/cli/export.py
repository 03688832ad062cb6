"""``qat-export``: export a finished run (or one of its checkpoints) to integer weights, verified.

    qat-export run_dir=outputs/digits_w4a4/2026-01-01_00-00-00            # -> <run_dir>/export
    qat-export ckpt=outputs/.../checkpoints/qat/last.ckpt format=onnx out=/tmp/exp

Keys: ``run_dir`` or ``ckpt`` (a checkpoint inside a run directory), ``out`` (default ``<run_dir>/export``),
``format`` (safetensors | onnx: ONNX adds a QDQ ``model.onnx``), ``verify`` (true: compare the reloaded
model with the fake-quant one on the validation split and fail on a mismatch), ``max_batches``, ``split``,
``verbose`` (true: print the traceback of an error before its one-line message).
Exit codes: 0 written, 1 bad arguments, run directory or output path, 2 verification failed (nothing
written).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "run_dir": None,
    "ckpt": None,
    "out": None,
    "format": "safetensors",
    "verify": True,
    "max_batches": 0,
    "split": "validation",
    "verbose": False,
}
CHOICES = {"format": ("safetensors", "onnx"), "split": ("validation", "test")}


def run_dir_of(args: dict[str, Any]) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint (``<run>/checkpoints/<phase>/<file>`` -> ``<run>``)."""
    from qat.cli._args import ArgError

    ckpt = Path(args["ckpt"]) if args.get("ckpt") else None
    if args.get("run_dir"):
        return Path(args["run_dir"]), ckpt
    if ckpt is None:
        raise ArgError("run_dir: missing; pass run_dir=<a qat-train output directory> or ckpt=<checkpoint>")
    return ckpt.resolve().parent.parent.parent, ckpt


def eval_batches(run: Any, split: str, max_batches: int | None) -> list[Any]:
    dm = run.datamodule
    dm.setup("fit" if split == "validation" else "test")
    loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
    out = []
    for i, b in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        out.append(b)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from qat.cli._args import parse_command_line
    from qat.cli._errors import exit_on_user_error
    from qat.deploy import VerificationError

    argv = sys.argv[1:] if argv is None else argv
    args = parse_command_line(argv, DEFAULTS, CHOICES, "qat-export", __doc__ or "")
    with exit_on_user_error(args["verbose"], "verbose=true", codes={VerificationError: 2}):
        report = _export(args)
    print(report.summary())


def _export(args: dict[str, Any]) -> Any:
    from qat.deploy import export
    from qat.runs import load_run

    run_dir, ckpt = run_dir_of(args)
    run = load_run(run_dir, checkpoint=ckpt)
    out = Path(args["out"]) if args["out"] else run_dir / "export"
    batches = eval_batches(run, args["split"], args["max_batches"]) if args["verify"] else None
    return export(
        run.model, out, batches=batches, task=run.task, formats=[args["format"]], verify=args["verify"],
        example_input=None if batches else _example(run),
    )  # fmt: skip


def _example(run: Any) -> Any:
    from qat.calibrate import batch_inputs

    return batch_inputs(eval_batches(run, "validation", 1)[0])


if __name__ == "__main__":
    main()
