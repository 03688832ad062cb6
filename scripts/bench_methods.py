"""Benchmark every quantization method on digits and pytext with the same seeds and steps.

For each dataset: one float baseline (trained once, shared as ``baseline.ckpt``), a float model fine-tuned
for as many steps as QAT gets (the fair reference), then PTQ and QAT at W8A8, W4A4, W2A2, ternary, binary,
FP8, uniform W3, and the automatic mixed-precision assignment at 3 and 4 average weight bits. PTQ uses
MSE-optimal ranges for int formats (the same config otherwise); QAT uses the recipe's config. Each QAT
model is exported to integer safetensors and reloaded in the integer runtime (verified on 2 batches).

Writes ``<out>/bench.json`` (after every run, so an interrupted benchmark keeps its results; finished runs
are skipped when restarted) and ``<out>/bench.md`` (the tables in docs/methods.md). Example::

    python scripts/bench_methods.py --out bench_out                       # both datasets
    python scripts/bench_methods.py --out bench_out --datasets digits     # seconds per run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from qat.cli.mixed import run as run_mixed
from qat.cli.train import CONFIG_DIR
from qat.deploy import export
from qat.io import write_json_atomic, write_text_atomic
from qat.quant.modules import deployed
from qat.runs import load_run
from qat.train.job import run as run_job

COMMON = ["logger=none", "export.enabled=false", "seed=0"]
INT_PTQ = ["quant.weight.scale=mse"]  # PTQ of an int weight config: MSE-optimal ranges instead of LSQ init
INT_PTQ_ACT = ["quant.activation.scale=mse"]  # ... and for static int activations


@dataclass
class Method:
    """One row: the overrides of its QAT run and the extra overrides that make its PTQ run."""

    name: str
    label: str
    qat: list[str]
    ptq: list[str] = field(default_factory=list)
    mixed_bits: float | None = None  # automatic mixed precision at this budget (config generated first)
    search: list[str] = field(default_factory=list)  # the base config of the width search


W4A4_ALL = ["~recipe", "quant=w4a4"]  # digits model and data are train.yaml's defaults


def digits_methods() -> tuple[str, list[str], list[Method]]:
    methods = [
        Method("w8a8", "W8A8 (int8 LSQ / int8 act)", ["recipe=digits_w8a8"], INT_PTQ + INT_PTQ_ACT),
        Method("w4a4", "W4A4 (LSQ / LSQ+)", ["recipe=digits_w4a4"], INT_PTQ + INT_PTQ_ACT),
        Method("w3a4", "W3A4 uniform, all layers", ["~recipe", "quant=w3a4"], INT_PTQ + INT_PTQ_ACT),
        Method("w2a2", "W2A2 (LSQ / LSQ+)", ["recipe=digits_w2a2"], INT_PTQ + INT_PTQ_ACT),
        Method("ternary", "ternary TWN, A8", ["recipe=digits_ternary"], INT_PTQ_ACT),
        Method("binary", "binary XNOR, A8", ["recipe=digits_binary"], INT_PTQ_ACT),
        Method("fp8", "FP8 E4M3 W+A", ["recipe=digits_fp8"]),
        # The width search covers every layer (no first/last pins): compare with uniform W3A4 on all layers.
        Method("mixed3", "auto mixed 3.0 bits, A4", ["~recipe"], INT_PTQ + INT_PTQ_ACT, 3.0, W4A4_ALL),
        Method("mixed4", "auto mixed 4.0 bits, A4", ["~recipe"], INT_PTQ + INT_PTQ_ACT, 4.0, W4A4_ALL),
    ]
    return "recipe=digits_w4a4", [], methods


def pytext_methods(steps: int, test_batches: int) -> tuple[str, list[str], list[Method]]:
    base = [
        f"++trainer.limit_train_batches={steps}",
        "++trainer.limit_val_batches=4",
        f"++trainer.limit_test_batches={test_batches}",
        "trainer.max_epochs=1",
        "calibration.batches=8",
    ]
    r = "recipe=pytext_w4g32a8dyn"
    methods = [  # the rows the targets are about first: a cut-short run still answers them
        Method("w2a8", "W2 g32, A8 per token", [r, "quant=w2g32a8dyn"], INT_PTQ),
        Method("ternary", "ternary BitNet b1.58 (absmean), A8", ["recipe=pytext_bitnet"]),
        Method("ternary_twn", "ternary, TWN scale, A8 (BitNet-style)", ["recipe=pytext_ternary"]),
        Method("w3a8", "W3 g32, A8 per token", [r, "quant=w3g32a8dyn"], INT_PTQ),
        Method("mixed3", "auto mixed 3.0 bits, A8", [r], INT_PTQ, 3.0, [r]),
        Method("w4a8", "W4 g32, A8 per token", [r, "quant=w4g32a8dyn"], INT_PTQ),
        Method("mixed4", "auto mixed 4.0 bits, A8", [r], INT_PTQ, 4.0, [r]),
        Method("w8a8", "W8A8 (int8 / a8 per token)", [r, "quant=w8a8dyn"], INT_PTQ),
        Method("w4a4", "W4A4 (g32 / a4 per token)", [r, "quant=w4g32a4dyn"], INT_PTQ),
        Method("w2a2", "W2A2 (g32 / a2 per token)", [r, "quant=w2g32a2dyn"], INT_PTQ),
        Method("binary", "binary XNOR, A8", [r, "quant=binary_a8dyn"]),
        Method("fp8", "FP8 E4M3 W+A (per token)", [r, "quant=fp8_e4m3_dyn"]),
    ]
    return r, base, methods


def compose_cfg(name: str, overrides: list[str], out: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, f"paths.output_dir={out}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


class Bench:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "bench.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        write_json_atomic(self.path, self.results)

    def job(self, dataset: str, key: str, overrides: list[str]) -> dict[str, Any]:
        """Run (or reuse) one qat-train job; returns its metrics (config dropped)."""
        runs = self.results.setdefault(dataset, {}).setdefault("runs", {})
        if key in runs:
            return runs[key]
        out = self.out / dataset / key
        print(f"\n=== {dataset}/{key}: {' '.join(overrides)}", flush=True)
        t0 = time.time()
        metrics = run_job(compose_cfg("train", [*COMMON, *overrides], out))
        entry = {k: v for k, v in metrics.items() if k != "config"}
        entry["overrides"] = overrides
        entry["run_dir"] = str(out)
        entry["wall_s"] = round(time.time() - t0, 1)
        if metrics["mode"] == "qat":
            entry["export"] = self.export(out)
        runs[key] = entry
        self.save()
        return entry

    def export(self, run_dir: Path) -> dict[str, Any]:
        """Export the QAT model to integer safetensors and reload it in the integer runtime (2 batches)."""
        try:
            run = load_run(run_dir)
            model = deployed(copy.deepcopy(run.model)).eval()
            run.datamodule.setup("fit")
            batches = list(islice(run.datamodule.val_dataloader(), 2))
            report = export(model, run_dir / "export", batches=batches, task=run.task)
            v = report.verification or {}
            return {
                "ok": True,
                "exported_bytes": report.exported_bytes,
                "file_bytes": report.file_bytes,
                "top1_agreement": v.get("top1_agreement"),
                "max_abs_logit_diff": v.get("max_abs_logit_diff"),
            }
        except Exception as e:  # recorded, not fatal: the table shows which methods fail to export
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}

    def mixed(self, dataset: str, base: list[str], bits: float, float_ckpt: str) -> str:
        """Generate the mixed-precision quant config for ``bits`` (once); returns its config name."""
        name = f"mixed_{dataset}_w{bits:g}"
        path = self.out / "quant" / f"{name}.yaml"
        info = self.results.setdefault(dataset, {}).setdefault("mixed", {})
        if name not in info or not path.exists():
            overrides = [
                *COMMON,
                *base,
                f"baseline.ckpt={float_ckpt}",
                "baseline.max_epochs=0",
                f"budget.bits_per_weight={bits}",
                f"mixed.name={name}",
                f"mixed.out={path}",
            ]
            report = run_mixed(compose_cfg("mixed", overrides, self.out / dataset / f"sens_{bits:g}"))
            info[name] = {k: report[k] for k in ("achieved_bits_per_weight", "bits", "pinned", "sensitivity")}
            self.save()
        return name

    def dataset(
        self,
        dataset: str,
        recipe: str,
        base: list[str],
        methods: list[Method],
        baseline_epochs: int,
        ft: int,
        only: list[str] | None = None,
    ) -> None:
        """Float baseline, float fine-tune, then PTQ and QAT of each method, all from the same weights."""
        fp32 = [recipe, *base, "quant=fp32"]
        float_run = self.job(dataset, "float", [*fp32, f"baseline.max_epochs={baseline_epochs}"])
        ckpt = str(Path(float_run["run_dir"]) / "checkpoints" / "float" / "last.ckpt")
        start = [f"baseline.ckpt={ckpt}", "baseline.max_epochs=0"]
        # Float fine-tuned for the QAT steps: the baseline trainer runs with the QAT phase's limits.
        self.job(dataset, "float_ft", [*fp32, f"baseline.ckpt={ckpt}", f"baseline.max_epochs={ft}"])
        self.results[dataset]["methods"] = [m.__dict__ for m in methods]
        for m in methods:
            if only and m.name not in only:
                continue
            qat = [*base, *m.qat, *start]
            if m.mixed_bits is not None:
                name = self.mixed(dataset, [*base, *m.search], m.mixed_bits, ckpt)
                qat += [f"hydra.searchpath=[file://{self.out}]", f"quant={name}"]
            self.job(dataset, f"{m.name}_qat", qat)
            self.job(dataset, f"{m.name}_ptq", [*qat, "mode=ptq", *m.ptq])


# Display order of the rows (the run order puts the pytext target rows first).
ORDER = [
    "w8a8",
    "w4a4",
    "w3a4",
    "w2a2",
    "w4a8",
    "w3a8",
    "w2a8",
    "ternary",
    "ternary_twn",
    "binary",
    "fp8",
    "mixed3",
    "mixed4",
]


def _rank(method: dict[str, Any]) -> int:
    return ORDER.index(method["name"]) if method["name"] in ORDER else len(ORDER)


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for dataset, res in results.items():
        runs = res.get("runs", {})
        if "float" not in runs:
            continue
        metric = runs["float"]["primary_metric"]
        higher = runs["float"]["higher_is_better"]
        fmt = (lambda v: f"{100 * v:.2f}%") if metric == "acc" else (lambda v: f"{v:.3f}")
        float_bytes = runs["float"]["size_bytes"]["baseline"]
        ft = runs.get("float_ft", {}).get("quantized", {}).get(metric)
        lines += [f"### {dataset} ({metric}, {'higher' if higher else 'lower'} is better)", ""]
        # Every QAT/PTQ job re-evaluates the float weights on the same test limits: take them from one.
        evaluated = [r for k, r in runs.items() if k.endswith(("_qat", "_ptq"))] or [runs["float"]]
        start = evaluated[0]["baseline"][metric]
        lines.append(
            f"Float baseline: {fmt(start)}; fine-tuned for the QAT steps: "
            f"{fmt(ft) if ft is not None else 'n/a'}; float32 size {float_bytes:,} B."
        )
        lines += [
            "",
            "| method | PTQ | QAT | QAT vs float-ft | size (exported, verified) |",
            "|---|---|---|---|---|",
        ]
        rows = sorted(res.get("methods", []), key=_rank)
        for m in rows:
            ptq, qat = runs.get(f"{m['name']}_ptq"), runs.get(f"{m['name']}_qat")
            if qat is None:
                continue
            q = qat["quantized"][metric]
            p = ptq["quantized"][metric] if ptq else None
            gap = "" if ft is None else f"{100 * (q - ft) / ft:+.1f}%"
            ex = qat.get("export", {})
            exported = (
                f"{ex['exported_bytes']:,} B ({float_bytes / ex['exported_bytes']:.1f}x)"
                if ex.get("ok")
                else f"failed: {ex.get('error', '?')[:60]}"
            )
            # metrics.json's size_bytes.quantized is the same number as the export's (qat.size).
            ptq_cell = fmt(p) if p is not None else "n/a"
            lines.append(f"| {m['label']} | {ptq_cell} | {fmt(q)} | {gap} | {exported} |")
        mixed = res.get("mixed", {})
        if mixed:
            lines += ["", "Automatic mixed-precision assignments (weight bits per searched layer):", ""]
            for name, info in mixed.items():
                widths = ", ".join(f"{k}={v}" for k, v in info["bits"].items())
                lines.append(f"- `{name}`: {info['achieved_bits_per_weight']:.2f} bits/weight: {widths}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--datasets", nargs="+", default=["digits", "pytext"], choices=["digits", "pytext"])
    p.add_argument("--pytext-steps", type=int, default=200, help="QAT (and float fine-tune) steps")
    p.add_argument("--pytext-baseline-epochs", type=int, default=3, help="float pre-training: epochs x steps")
    p.add_argument("--pytext-test-batches", type=int, default=20)
    p.add_argument("--methods", nargs="+", help="run only these rows (e.g. w2a8 ternary); default: all")
    p.add_argument("--report-only", action="store_true", help="rewrite bench.md from bench.json, run nothing")
    args = p.parse_args()
    args.out = args.out.absolute()
    bench = Bench(args.out)
    t0 = time.time()
    if args.report_only:
        args.datasets = []
    if "digits" in args.datasets:
        recipe, base, methods = digits_methods()
        bench.dataset("digits", recipe, base, methods, baseline_epochs=15, ft=10, only=args.methods)
    if "pytext" in args.datasets:
        recipe, base, methods = pytext_methods(args.pytext_steps, args.pytext_test_batches)
        epochs = args.pytext_baseline_epochs
        bench.dataset("pytext", recipe, base, methods, baseline_epochs=epochs, ft=1, only=args.methods)
    md = markdown(bench.results)
    write_text_atomic(args.out / "bench.md", md)
    print(md)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
