"""``qat-eval``: the before/after table of a run: float, fake-quant and exported integer model (and the
ONNX model when the export has one), each with the primary metric, size and latency.

    qat-eval run_dir=outputs/digits_w4a4/2026-01-01_00-00-00 batch_sizes=1,64 repeats=30

Latency is the median of ``repeats`` timed forward passes after ``warmup`` untimed ones, at each batch
size, on CPU with ``threads`` intra-op threads (0: torch's default). Size is :mod:`qat.size`'s one
definition, the bytes of the model's tensors as stored: the float model's, and for the fake-quant and
integer models the export's tensor payload (the same number in ``metrics.json`` and the export report).
The file column is bytes on disk: ``model.safetensors`` (payload plus header) and ``model.onnx``. Prints
the table and writes ``eval.json`` (default ``<run_dir>/eval.json``). An error ends the command with one
line and exit code 1 (``verbose=true`` prints its traceback first).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "run_dir": None,
    "ckpt": None,
    "export": None,
    "split": "test",
    "max_batches": 0,
    "batch_sizes": (1, 64),
    "warmup": 5,
    "repeats": 30,
    "threads": 0,
    "out": None,
    "verbose": False,
}
CHOICES = {"split": ("validation", "test")}


def main(argv: Sequence[str] | None = None) -> None:
    from qat.cli._args import parse_command_line
    from qat.cli._errors import exit_on_user_error

    argv = sys.argv[1:] if argv is None else argv
    args = parse_command_line(argv, DEFAULTS, CHOICES, "qat-eval", __doc__ or "")
    with exit_on_user_error(args["verbose"], "verbose=true"):
        _evaluate(args)


def _evaluate(args: dict[str, Any]) -> None:
    import torch

    from qat.cli.export import eval_batches, run_dir_of
    from qat.deploy import load_quantized
    from qat.deploy.evaluate import METRIC, evaluate_rows, format_table
    from qat.rewrite import unprepare
    from qat.runs import find_checkpoint, load_run
    from qat.size import float_size_bytes, quantized_size_bytes, safetensors_payload_bytes

    run_dir, ckpt = run_dir_of(args)
    run = load_run(run_dir, checkpoint=ckpt)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    task = run.task
    batches = eval_batches(run, args["split"], args["max_batches"])
    export_dir = Path(args["export"]) if args["export"] else run_dir / "export"
    models: dict[str, tuple[Any, int | None, int | None]] = {}  # name: (model, size, file bytes)

    float_ckpt = run_dir / "checkpoints" / "float" / "last.ckpt"
    if float_ckpt.exists() and float_ckpt != find_checkpoint(run_dir):
        float_model = load_run(run_dir, checkpoint=float_ckpt).model
        float_note = "float baseline"
    else:
        float_model = unprepare(copy.deepcopy(run.model))
        float_note = "QAT weights, quantizers removed"
    models["float"] = (float_model.eval(), float_size_bytes(float_model), None)
    models["fake-quant"] = (run.model.eval(), quantized_size_bytes(run.model), None)
    if (export_dir / "quant_config.json").exists():
        int_model = load_quantized(export_dir, unprepare(copy.deepcopy(run.model)))
        weights = export_dir / "model.safetensors"
        models["integer (export)"] = (int_model, safetensors_payload_bytes(weights), weights.stat().st_size)
        if (export_dir / "model.onnx").exists():
            from qat.deploy.onnx import onnx_session_forward

            onnx_fn = onnx_session_forward(export_dir / "model.onnx", threads=int(args["threads"]) or None)
            models["onnx (onnxruntime)"] = (onnx_fn, None, (export_dir / "model.onnx").stat().st_size)
    else:
        print(f"note: {export_dir} holds no export; run qat-export first to compare the integer model")
    rows = evaluate_rows(models, batches, task, tuple(args["batch_sizes"]), args["warmup"], args["repeats"])
    rows[0].notes = float_note
    print(f"{run_dir} ({task}, {args['split']} split, {torch.get_num_threads()} threads)")
    print(format_table(rows, task))
    out = Path(args["out"]) if args["out"] else run_dir / "eval.json"
    result = {
        "run_dir": str(run_dir),
        "task": task,
        "metric": METRIC.get(task, "metric"),
        "split": args["split"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args["repeats"],
        "warmup": args["warmup"],
        "rows": [r.to_dict() for r in rows],
    }
    from qat.io import write_json_atomic

    write_json_atomic(out, result)  # readers never see half a file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
