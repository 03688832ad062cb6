#!/usr/bin/env python
"""Deploy speed: every export target against the float model, in one process, interleaved rounds.

Part 1, the FFN stack of issue 14 (4 residual blocks, d=768, hidden 3072, a linear head; W8A8: per-channel
int8 weights, static per-tensor int8 activations), as users run it:

* float PyTorch, the prepared (fake-quant) model in eval mode, the integer runtime (``qat.load_quantized``);
* our ONNX export in onnxruntime, against the float model exported to ONNX and run in onnxruntime, and
  onnxruntime's own ``quantize_dynamic`` of that float model (the engine's reference int8 speed).

Part 2 (``--llm``), a Llama with SmolLM2-135M's layer shapes (d=576, hidden 1536, 9/3 heads; ``--layers``
layers, random weights): float PyTorch, fake quant, the integer runtime and the GGUF export (Q8_0 and Q4_0
presets) run by llama.cpp (``llama-cpp-python``, the ``llama`` extra; skipped when absent), on a prompt of
1 and of 64 tokens.

Each round times every model once (median of ``--repeats`` calls after warm-up, ``qat.deploy.evaluate``'s
``latency_ms``); a ratio is taken within a round and the table shows medians over ``--rounds`` rounds, so
the machine's load shifts numerator and denominator alike.

    python scripts/bench_deploy.py                         # FFN stack, 1 and 2 threads, batch 1 and 64
    python scripts/bench_deploy.py --llm --threads 1 2     # + the Llama through llama.cpp
    python scripts/bench_deploy.py --llm --skip-ffn        # only the Llama
    python scripts/bench_deploy.py --quick                 # a smaller run, to check the script
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ffn import batches, ffn_float, ffn_w8a8  # noqa: E402

import qat  # noqa: E402
from qat.deploy.evaluate import latency_ms  # noqa: E402

Predict = Callable[[Any], Any]


def interleaved(models: dict[str, Predict], x: Any, base: str, rounds: int, repeats: int) -> dict[str, dict]:
    """``{name: {"ms": median ms, "x": median ratio to base}}``; every round times every model once."""
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, predict in models.items():
            times[name].append(latency_ms(predict, x, warmup=2, repeats=repeats))
    ratios = {n: [t / b for t, b in zip(times[n], times[base], strict=True)] for n in models}
    return {n: {"ms": statistics.median(times[n]), "x": statistics.median(ratios[n])} for n in models}


def ort_models(
    float_model: torch.nn.Module, export: Path, x: torch.Tensor, threads: int
) -> dict[str, Predict]:
    """Our ONNX, the float model's ONNX and onnxruntime's ``quantize_dynamic`` of it, each in onnxruntime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qat.deploy.onnx import onnx_session_forward

    float_onnx, dyn_onnx = export / "float.onnx", export / "float_dynamic_int8.onnx"
    if not float_onnx.exists():
        torch.onnx.export(
            float_model, (x,), str(float_onnx), dynamo=True, input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )  # fmt: skip
        quantize_dynamic(str(float_onnx), str(dyn_onnx), per_channel=True, weight_type=QuantType.QInt8)
    return {
        "onnx (ours, W8A8)": onnx_session_forward(export / "model.onnx", threads),
        "onnx float": onnx_session_forward(float_onnx, threads),
        "onnx ORT quantize_dynamic": onnx_session_forward(dyn_onnx, threads),
    }


def ffn_part(args: argparse.Namespace, tmp: Path) -> list[dict]:
    d, hidden = (256, 1024) if args.quick else (768, 3072)
    float_model = ffn_float(d, hidden)
    cal = batches(d, n=4 if args.quick else 8)
    prepared = ffn_w8a8(float_model, cal)
    report = qat.export(prepared, tmp / "ffn", batches=cal, task="classification", targets=["onnx"])
    runtime = qat.load_quantized(tmp / "ffn", ffn_float(d, hidden))
    print(f"FFN stack d={d} hidden={hidden}: {report.summary()}")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for bs in args.batch_sizes:
            x = cal[0][0][:1].repeat(bs, 1) if bs <= cal[0][0].shape[0] else torch.randn(bs, d)
            x = x[:bs].contiguous()
            models: dict[str, Predict] = {
                "float (PyTorch)": float_model,
                "fake-quant eval (PyTorch)": prepared,
                "integer runtime (native)": runtime,
                **ort_models(float_model, tmp / "ffn", x, threads),
            }
            with torch.inference_mode():
                res = interleaved(models, x, "float (PyTorch)", args.rounds, args.repeats)
            onnx_float = res["onnx float"]["ms"]
            for name, r in res.items():
                ort = r["ms"] / onnx_float if name.startswith("onnx") else None
                rows.append(
                    {"model": "ffn", "threads": threads, "batch": bs, "name": name, **r, "x_ort": ort}
                )
    return rows


def print_rows(rows: list[dict]) -> None:
    """The table: ms per call, and the ratio to float PyTorch (and, for ONNX rows, to the float ONNX)."""
    head = (
        f"{'model':6s} {'thr':>3s} {'batch':>5s}  {'engine':30s} {'ms':>9s} {'x float':>8s} {'x ORT fp':>8s}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ort = f"{r['x_ort']:8.2f}" if r.get("x_ort") is not None else " " * 8
        cells = f"{r['name']:30s} {r['ms']:9.3f} {r['x']:8.2f} {ort}"
        print(f"{r['model']:6s} {r['threads']:3d} {r['batch']:5d}  {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--llm", action="store_true", help="also the Llama through llama.cpp (GGUF)")
    p.add_argument("--skip-ffn", action="store_true", help="leave out the FFN stack (with --llm)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds: checks the script")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 3
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.skip_ffn else ffn_part(args, Path(tmp))
        if args.llm:
            from _llm import llm_part

            rows += llm_part(args, Path(tmp), interleaved)
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
