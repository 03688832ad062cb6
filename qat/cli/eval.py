"""``qat-eval``: the before/after table of a run: float, fake-quant and every export target written (the
integer runtime, and ONNX, GGUF, compressed-tensors when the export has them, each run by its engine),
each with the primary metric, size, file size and latency.

    qat-eval run_dir=outputs/digits_w4a4/2026-01-01_00-00-00 batch_sizes=[1,64] repeats=30

Latency is the median of ``repeats`` timed forward passes after ``warmup`` untimed ones, at each batch
size, on CPU with ``threads`` intra-op threads (0: torch's default). Size is :mod:`qat.size`'s one
definition, the bytes of the model's tensors as stored: the float model's, and for the fake-quant and
integer models the export's tensor payload (the same number in ``metrics.json`` and the export report).
The file column is bytes on disk: ``model.safetensors`` (payload plus header), ``model.onnx``, ... Prints
the table and writes ``eval.json`` (default ``<run_dir>/eval.json``). An error ends the command with one
line and exit code 1 (``verbose=true`` prints its traceback first).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qat.cli._app import run_app
from qat.conf import CONFIG_PATH, node, register

# The types of eval.yaml's keys.
Eval = node(
    "Eval", run_dir=str | None, ckpt=str | None, export=str | None, split=str, max_batches=int,
    batch_sizes=list[int], warmup=int, repeats=int, threads=int, out=str | None, verbose=bool,
)  # fmt: skip
register(__name__, eval=Eval)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from qat.cli._errors import exit_on_user_error

    with exit_on_user_error(cfg.verbose, "verbose=true"):
        _evaluate(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    run_app(_main, argv)


def _evaluate(cfg: DictConfig) -> None:
    import torch

    from qat.cli._errors import check_choice
    from qat.deploy.evaluate import compare, format_table
    from qat.deploy.schema import CONFIG_FILE
    from qat.rewrite import unprepare
    from qat.runs import SPLITS, checkpoint_file, eval_file, export_dir, latest_checkpoint, load_run
    from qat.tasks import TASKS

    check_choice("split", cfg.split, SPLITS)
    run = load_run(cfg.run_dir, checkpoint=cfg.ckpt)
    run_dir = run.path
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    task = run.task
    batches = run.batches(cfg.split, cfg.max_batches)
    export = Path(cfg.export) if cfg.export else export_dir(run_dir)

    float_ckpt = checkpoint_file(run_dir, "float")
    if float_ckpt.exists() and float_ckpt != latest_checkpoint(run_dir):
        float_model = load_run(run_dir, checkpoint=float_ckpt).model
        float_note = "float baseline"
    else:
        float_model = unprepare(copy.deepcopy(run.model))
        float_note = "QAT weights, quantizers removed"
    if not (export / CONFIG_FILE).exists():
        print(f"note: {export} holds no export; run qat-export first to compare the integer model")
    rows = compare(
        float_model, run.model, export if (export / CONFIG_FILE).exists() else None, batches, task,
        tuple(cfg.batch_sizes), cfg.warmup, cfg.repeats, int(cfg.threads) or None,
    )  # fmt: skip
    rows[0].notes = float_note
    print(f"{run_dir} ({task}, {cfg.split} split, {torch.get_num_threads()} threads)")
    print(format_table(rows, task))
    out = Path(cfg.out) if cfg.out else eval_file(run_dir)
    result = {
        "run_dir": str(run_dir),
        "task": task,
        "metric": TASKS[task].metric,
        "split": cfg.split,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "rows": [r.to_dict() for r in rows],
    }
    from qat.io import write_json_atomic

    write_json_atomic(out, result)  # readers never see half a file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
