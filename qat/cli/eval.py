"""``qat-eval``: the before/after table of a run: float, fake-quant and exported integer model (and the
ONNX model when the export has one), each with the primary metric, file size and latency.

    qat-eval run_dir=outputs/digits_w4a4/2026-01-01_00-00-00 batch_sizes=1,64 repeats=30

Latency is the median of ``repeats`` timed forward passes after ``warmup`` untimed ones, at each batch
size, on CPU with ``threads`` intra-op threads (0: torch's default). Sizes are serialized bytes: the float
and fake-quant state dicts as safetensors, the export's ``model.safetensors`` + ``quant_config.json``, and
``model.onnx``. Prints the table and writes ``eval.json`` (default ``<run_dir>/eval.json``).
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
}
CHOICES = {"split": ("validation", "test")}


def state_bytes(model: Any) -> int:
    """Size of the model's state dict serialized as safetensors (tied tensors stored once)."""
    from safetensors.torch import save

    seen: dict[tuple, str] = {}
    sd = {}
    for k, v in model.state_dict().items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if ident not in seen:
            seen[ident] = k
            sd[k] = v.detach().contiguous().clone()
    return len(save(sd))


def main(argv: Sequence[str] | None = None) -> None:
    from qat.cli._args import ArgError, fail, parse
    from qat.cli.export import eval_batches, run_dir_of

    try:
        args = parse(sys.argv[1:] if argv is None else argv, DEFAULTS, CHOICES)
        run_dir, ckpt = run_dir_of(args)
        from qat.runs import find_checkpoint, load_run

        run = load_run(run_dir, checkpoint=ckpt)
    except (ArgError, FileNotFoundError) as e:
        fail(str(e))
        return
    import torch

    from qat.export import ExportFormatError, load_quantized
    from qat.export.evaluate import METRIC, evaluate_rows, format_table
    from qat.rewrite import unprepare

    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    task = run.task
    batches = eval_batches(run, args["split"], args["max_batches"])
    export_dir = Path(args["export"]) if args["export"] else run_dir / "export"
    models: dict[str, tuple[Any, int | None]] = {}

    float_ckpt = run_dir / "checkpoints" / "float" / "last.ckpt"
    if float_ckpt.exists() and float_ckpt != find_checkpoint(run_dir):
        float_model = load_run(run_dir, checkpoint=float_ckpt).model
        float_note = "float baseline"
    else:
        float_model = unprepare(copy.deepcopy(run.model))
        float_note = "QAT weights, quantizers removed"
    models["float"] = (float_model.eval(), state_bytes(float_model))
    models["fake-quant"] = (run.model.eval(), state_bytes(run.model))
    if (export_dir / "quant_config.json").exists():
        try:
            int_model = load_quantized(export_dir, unprepare(copy.deepcopy(run.model)))
        except ExportFormatError as e:
            fail(str(e))
            return
        size = sum((export_dir / f).stat().st_size for f in ("model.safetensors", "quant_config.json"))
        models["integer (export)"] = (int_model, size)
        if (export_dir / "model.onnx").exists():
            from qat.export.onnx import onnx_session_forward

            onnx_fn = onnx_session_forward(export_dir / "model.onnx", threads=int(args["threads"]) or None)
            models["onnx (onnxruntime)"] = (onnx_fn, (export_dir / "model.onnx").stat().st_size)
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
    from qat.train.job import write_json_atomic

    write_json_atomic(out, result)  # readers never see half a file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
