#!/usr/bin/env python
"""Benchmark the export: size vs float, agreement with the fake-quant model, and latency of the integer
runtime vs the float model, for digits (DigitsCNN) and pytext (TinyGPT) at several quant configs.

Self-contained (no qat-train run needed): trains the float model briefly, then for each config prepares,
calibrates, fine-tunes with fake quant for a few steps, exports (with verification), reloads the export
in the integer runtime and times float / fake-quant / integer (/ ONNX) models on the same inputs.

    python scripts/bench_export.py                          # digits + pytext, w8a8 w4a4 w2a2
    python scripts/bench_export.py --tasks digits --quants w8a8 w4a8 --threads 1 --onnx

Latency: median of --repeats timed forward passes after --warmup untimed ones, CPU, --threads intra-op
threads. Numbers depend on the machine and its load: compare rows of one run, not across machines.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import qat
from qat.data import DigitsDataModule, PyTextDataModule
from qat.deploy.evaluate import evaluate_rows, format_table
from qat.models import DigitsCNN, TinyGPT


def train(model: torch.nn.Module, batches: list[Any], steps: int, lr: float) -> torch.nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for x, y in itertools.islice(itertools.cycle(batches), steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def setup_task(task: str, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    if task == "digits":
        dm = DigitsDataModule(batch_size=64)
        dm.setup()
        return {
            "kind": "classification",
            "make": DigitsCNN,
            "train": list(dm.train_dataloader()),
            "cal": list(dm.calibration_dataloader())[:8],
            "val": list(dm.val_dataloader()),
            "test": list(dm.test_dataloader()),
            "float_steps": 150 if quick else 400,
            "qat_steps": 40 if quick else 150,
            "lr": 1e-2,
            "batch_sizes": (1, 64),
        }
    seq = 64 if quick else 128
    dm = PyTextDataModule(
        seq_len=seq, batch_size=32, max_files=200, max_bytes=600_000 if quick else 2_000_000
    )
    dm.setup()

    def make() -> TinyGPT:
        return TinyGPT(vocab_size=256, seq_len=seq, d_model=128, n_layers=2, n_heads=4)

    return {
        "kind": "lm",
        "make": make,
        "train": list(itertools.islice(dm.train_dataloader(), 400)),
        "cal": list(itertools.islice(dm.calibration_dataloader(), 8)),
        "val": list(itertools.islice(dm.val_dataloader(), 4 if quick else 12)),
        "test": list(itertools.islice(dm.test_dataloader(), 4 if quick else 12)),
        "float_steps": 150 if quick else 600,
        "qat_steps": 30 if quick else 150,
        "lr": 2e-3,
        "batch_sizes": (1, 8),
    }


def bench_one(task: str, t: dict[str, Any], float_model: torch.nn.Module, qname: str, args: Any) -> dict:
    torch.manual_seed(1)
    model = qat.prepare(copy.deepcopy(float_model), qname)
    qat.calibrate(model, t["cal"])
    train(model, t["train"], t["qat_steps"], t["lr"] / 5)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        t0 = time.time()
        report = qat.export(
            model, out, batches=t["val"], task=t["kind"], targets=["onnx"] if args.onnx else []
        )
        export_s = time.time() - t0
        runtime = qat.load_quantized(out, t["make"]())
        models: dict[str, Any] = {  # name: (model, size as qat.size defines it, file bytes)
            "float": (float_model, report.float_bytes, None),
            "fake-quant": (model, report.exported_bytes, None),
            "integer": (runtime, report.exported_bytes, report.file_bytes),
        }
        if args.onnx:
            from qat.deploy.onnx import onnx_session_forward

            onnx_fn = onnx_session_forward(out / "model.onnx", threads=args.threads)
            models["onnx"] = (onnx_fn, None, (out / "model.onnx").stat().st_size)
        rows = evaluate_rows(models, t["test"], t["kind"], t["batch_sizes"], args.warmup, args.repeats)
    print(f"\n== {task} {qname}: export {export_s:.1f}s\n{report.summary()}")
    print(format_table(rows, t["kind"]))
    lat = {r.name: r.latency_ms for r in rows}
    v = report.verification or {}
    return {
        "task": task,
        "quant": qname,
        "float_bytes": report.float_bytes,
        "exported_bytes": report.exported_bytes,
        "file_bytes": report.file_bytes,
        "budget_bytes": report.budget_bytes,
        "ratio": report.ratio,
        "budget_ok": report.budget_ok,
        "verification": v,
        "int_mm_layers": sum(bool(r.get("int_mm")) for r in report.layers),
        "layers": len(report.layers),
        "rows": [r.to_dict() for r in rows],
        "speedup_int_vs_float": {str(bs): lat["float"][bs] / lat["integer"][bs] for bs in t["batch_sizes"]},
        "onnx": report.onnx,
    }


def print_table(results: list[dict]) -> None:
    """The closing Markdown table: size, agreement, metric and latency per task and config."""
    head = ["task", "quant", "float B", "export B", "ratio", "top-1 agree", "max rel diff int / onnx",
            "metric float / fq / int", "ms bs1 int / float", "ms bsN int / float"]  # fmt: skip
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        rows = {x["name"]: x for x in r["rows"]}
        fl, it = rows["float"]["latency_ms"], rows["integer"]["latency_ms"]
        bs = list(fl)
        v = r["verification"]
        cells = [
            r["task"], r["quant"], f"{r['float_bytes']:,}", f"{r['exported_bytes']:,}", f"{r['ratio']:.2f}x",
            f"{100 * v.get('top1_agreement', float('nan')):.2f}%",
            f"{v.get('max_rel_logit_diff', float('nan')):.1e} / "
            f"{(r['onnx'] or {}).get('max_rel_logit_diff', float('nan')):.1e}",
            " / ".join(f"{rows[k]['metric']:.4g}" for k in ("float", "fake-quant", "integer")),
            f"{it[bs[0]]:.3f} / {fl[bs[0]]:.3f}", f"{it[bs[-1]]:.3f} / {fl[bs[-1]]:.3f} (bs{bs[-1]})",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["digits", "pytext"], choices=["digits", "pytext"])
    ap.add_argument("--quants", nargs="+", default=["w8a8", "w4a4", "w2a2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also export ONNX and time it in onnxruntime")
    ap.add_argument("--quick", action="store_true", help="shorter training and smaller data (smoke run)")
    ap.add_argument("--out", default="outputs/bench_export.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for task in args.tasks:
        t = setup_task(task, args.quick)
        torch.manual_seed(0)
        t0 = time.time()
        float_model = train(t["make"](), t["train"], t["float_steps"], t["lr"])
        print(f"[{task}] float model trained in {time.time() - t0:.1f}s")
        for qname in args.quants:
            results.append(bench_one(task, t, float_model, qname, args))
    print_table(results)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": args.quick,
        "loadavg_1min": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
