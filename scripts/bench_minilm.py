"""Benchmark: quantize the pretrained all-MiniLM-L6-v2 with each ``minilm_*`` recipe, as PTQ and as QAT.

For every (recipe, mode) it runs the main job (``qat-train recipe=<recipe> mode=<mode>``), which reports
the mean cosine similarity between the quantized model's sentence embeddings and the float model's, and
the nearest-neighbour retrieval agreement, on the test split. Then it rebuilds the quantized model from
the run (the QAT checkpoint, or the same calibration for PTQ), exports it to integer weights with
verification, reloads the export in the integer runtime and scores the runtime model the same way. It
also checks that the runtime reproduces the fake-quant model exactly (max |diff|: both compute the same
integer GEMMs), and how far the runtime's dequantise-then-float-GEMM path (``int_matmul=False``) is from
it. A run directory that already holds ``metrics.json`` is reused (only the export and scoring are redone).

    OMP_NUM_THREADS=1 python scripts/bench_minilm.py                        # all recipes, ptq + qat
    python scripts/bench_minilm.py --recipes minilm_w8a8 --modes qat -- trainer.limit_train_batches=50

Writes ``<out>/bench_minilm.json`` (atomically; rows of earlier runs into the same ``--out`` are kept) and
prints a table. On a shared CPU, one thread per
process (``OMP_NUM_THREADS=1``) is several times faster than oversubscribed cores.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import qat
from qat import runs
from qat.calibrate import calibrate
from qat.cli.train import CONFIG_DIR
from qat.deploy import VerificationError
from qat.hf.models import SentenceEncoder
from qat.io import write_json_atomic
from qat.train.embed import embedding_metrics
from qat.train.job import quant_config, run
from qat.train.resume import model_state

RECIPES = ("minilm_w8a8", "minilm_w4g32a8dyn", "minilm_bitnet")
MODES = ("ptq", "qat")
# PTQ baselines use MSE-optimal weight ranges and EMA-calibrated static activation ranges: the recipes'
# learned (LSQ/LSQ+) scales would only get their initial guess without training, which is not a fair PTQ
# range. Ternary absmean is a closed-form rule. Observers are frozen once calibrated (the same scales: the
# weights do not change), so the test forwards do not redo the MSE search over the embedding table.
PTQ_OVERRIDES = {
    "minilm_w8a8": [
        "quant.weight.scale=mse",
        "quant.activation.scale=ema",
        "schedule.freeze_observers_step=0",
    ],
    "minilm_w4g32a8dyn": ["quant.weight.scale=mse", "schedule.freeze_observers_step=0"],
}


def compose_run(recipe: str, mode: str, out_dir: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"recipe={recipe}", f"mode={mode}", "logger=csv", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def embed_forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Export verification forward: sentence embeddings of an ``(input_ids, attention_mask)`` batch."""
    ids, mask = batch
    return model(ids, mask)


def rebuild_quantized(cfg: DictConfig, dm: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(quantized model as the run left it, float teacher): QAT from its last checkpoint, PTQ by repeating
    the run's deterministic calibration and freezing the observers as the job does."""
    torch.manual_seed(int(cfg.seed))
    model = instantiate(cfg.model)
    teacher = copy.deepcopy(model).eval()
    qat.prepare(model, quant_config(cfg))
    if cfg.mode == "qat":
        model.load_state_dict(model_state(runs.checkpoint_file(cfg.paths.output_dir, "qat")))
    else:
        calibrate(model, dm.calibration_dataloader(), int(cfg.calibration.batches))
    instantiate(cfg.schedule).apply(model, step=10**9)  # end state: fake quant on, observers frozen
    return model.eval(), teacher


@torch.no_grad()
def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, batches: list) -> float:
    """Largest elementwise difference between two embedding models over ``(ids, mask)`` batches."""
    return max(float((a(*x) - b(*x)).abs().max()) for x in batches)


def export_and_verify(
    model: torch.nn.Module, export_dir: Path, batches: list
) -> tuple[qat.deploy.ExportReport, str | None]:
    """The exporter's own verification (elementwise, 1e-3 of the output range, integer GEMMs where the
    formats allow). Deep static-activation models can fail it although the export is right: ulp-level
    differences of the integer GEMMs flip the rounding of a few static-scale activations and the flips
    compound over the layers. Then the export is written unverified and the caller checks the runtime
    against the fake-quant model and the task metrics instead; the exporter's message is returned."""
    try:
        return qat.export(model, export_dir, batches=batches, forward=embed_forward), None
    except VerificationError as e:
        return qat.export(model, export_dir, batches=None, forward=embed_forward), str(e)


def bench_one(recipe: str, mode: str, out: Path, overrides: list[str], verify_batches: int = 4) -> dict:
    """Run one (recipe, mode) (or reuse a finished run), export, reload and score both models."""
    run_dir = out / f"{recipe}-{mode}"
    extra = PTQ_OVERRIDES.get(recipe, []) if mode == "ptq" else []
    cfg = compose_run(recipe, mode, run_dir, [*extra, *overrides])
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        metrics = run(cfg)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model, teacher = rebuild_quantized(cfg, dm)
    test = list(dm.test_dataloader())
    limit = cfg.trainer.get("limit_test_batches")
    if isinstance(limit, int):
        test = test[:limit]
    report, verify_error = export_and_verify(model, run_dir / "export", test[:verify_batches])
    runtime = qat.load_quantized(run_dir / "export", instantiate(cfg.model))
    rt = embedding_metrics(runtime, teacher, test)
    fq = embedding_metrics(model, teacher, test)
    rt_vs_fq = embedding_metrics(runtime, model, test)
    dequant = qat.load_quantized(run_dir / "export", instantiate(cfg.model), int_matmul=False)
    return {
        "recipe": recipe,
        "mode": mode,
        "quant": metrics["quant"],
        "cosine": metrics["quantized"]["cosine"],
        "agreement": metrics["quantized"]["agreement"],
        "rebuilt_cosine": fq["cosine"],
        "runtime_cosine": rt["cosine"],
        "runtime_agreement": rt["agreement"],
        "runtime_vs_fakequant_cosine": rt_vs_fq["cosine"],
        "runtime_max_abs_diff": max_abs_diff(model, runtime, test[:verify_batches]),
        "dequant_path_max_abs_diff": max_abs_diff(model, dequant, test[:verify_batches]),
        "test_sentences": rt["n"],
        "export_verified": report.verification is not None and bool(report.verification["passed"]),
        "export_verification_error": verify_error,
        "int_gemm_layers": sum(bool(getattr(m, "uses_int_mm", False)) for m in runtime.modules()),
        "float_bytes": report.float_bytes,
        "exported_bytes": report.exported_bytes,
        "job_wall_s": metrics["wall_time_s"],
        "threads": torch.get_num_threads(),
        "run_dir": str(run_dir),
    }


INT8_PC = {"format": "int8", "granularity": "per_channel"}
A8_STATIC = {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"}
A8_DYNAMIC = {"format": "int8", "granularity": "per_token", "symmetric": False, "dynamic": True}
EMB = ["bert.embeddings.*"]
# PTQ of one part of the model at a time: where W8A8's error comes from.
ABLATIONS: dict[str, dict[str, Any]] = {
    "int8 weights, all": {"weight": INT8_PC},
    "int8 weights, encoder linears": {"weight": INT8_PC, "exclude": EMB},
    "int8 weights, embeddings per row": {"weight": INT8_PC, "include": EMB},
    "int8 weights, embeddings per dim": {"weight": dict(INT8_PC, axis=1), "include": EMB},
    "int8 static act., all linears": {"weight": None, "activation": A8_STATIC},
    "int8 static act., q/k/v inputs": {"weight": None, "activation": A8_STATIC, "include": ["*.self.*"]},
    "int8 static act., attn-out inputs": {
        "weight": None, "activation": A8_STATIC, "include": ["*.attention.output.dense"]
    },
    "int8 static act., FFN-in inputs": {
        "weight": None, "activation": A8_STATIC, "include": ["*.intermediate.*"]
    },
    "int8 static act., FFN-out inputs": {
        "weight": None, "activation": A8_STATIC, "include": ["*.layer.*.output.dense"],
        "exclude": ["*.attention.output.dense"],
    },
    "int8 dynamic act., all linears": {"weight": None, "activation": A8_DYNAMIC},
}  # fmt: skip
# The same parts with SmoothQuant (alpha 0.8, what recipe minilm_w8a8 uses): int8 weights (min/max of W * s)
# and static activations, since the factors move range from the inputs into the weights.
SMOOTH_PARTS = {
    "all linears": {},
    "q/k/v": {"include": ["*.self.*"]},
    "attn-out": {"include": ["*.attention.output.dense"]},
    "FFN-in": {"include": ["*.intermediate.*"]},
    "FFN-out": {"include": ["*.layer.*.output.dense"], "exclude": ["*.attention.output.dense"]},
}
for _part, _sel in SMOOTH_PARTS.items():
    ABLATIONS[f"SmoothQuant 0.8: int8 W + static act., {_part}"] = {
        "weight": dict(INT8_PC, scale="minmax"), "activation": A8_STATIC, "smooth": 0.8, **_sel
    }  # fmt: skip


class _Replay:
    """Stands in for a model: returns precomputed embeddings batch by batch, in order."""

    def __init__(self, emb: torch.Tensor, sizes: list[int]) -> None:
        self.parts = list(emb.split(sizes))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.parts.pop(0)


@torch.no_grad()
def ablation(out: Path, calibration_batches: int = 8) -> list[dict]:
    """PTQ error by part of the model, and how sensitive agreement is to (isotropic) embedding noise."""
    cfg = compose_run("minilm_w8a8", "ptq", out / "ablation", [])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    base = instantiate(cfg.model).eval()
    test = list(dm.test_dataloader())
    sizes = [ids.shape[0] for ids, _ in test]
    teacher = torch.cat([base(ids, mask) for ids, mask in test])
    sim = teacher @ teacher.T
    sim.fill_diagonal_(-2.0)
    top2 = sim.topk(2, dim=1).values
    share = float((top2[:, 0] - top2[:, 1] < 0.002).float().mean())
    rows: list[dict] = [{"name": "teacher: nearest-neighbour margin < 0.002", "share": share}]
    g = torch.Generator().manual_seed(0)
    for sigma in (0.002, 0.005):
        noisy = F.normalize(teacher + sigma * torch.randn(teacher.shape, generator=g), dim=-1)
        fig = embedding_metrics(_Replay(noisy, sizes), _Replay(teacher, sizes), test)
        rows.append({"name": f"isotropic noise sigma={sigma}", **fig})
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the float model at bf16 precision: a floor
        fig = embedding_metrics(base, _Replay(teacher, sizes), test)
    rows.append({"name": "float model, bf16 autocast", **fig})
    for name, qcfg in ABLATIONS.items():
        model = qat.prepare(copy.deepcopy(base), qcfg)
        calibrate(model, dm.calibration_dataloader(), calibration_batches)
        rows.append({"name": name, **embedding_metrics(model.eval(), _Replay(teacher, sizes), test)})
    for r in rows:
        figs = (
            f"share {100 * r['share']:.1f}%"
            if "share" in r
            else (f"cosine {r['cosine']:.5f}  agreement {100 * r['agreement']:.1f}%")
        )
        print(f"{r['name']:45s} {figs}")
    write_json_atomic(out / "ablation.json", {"results": rows, "calibration_batches": calibration_batches})
    return rows


@torch.no_grad()
def scale_init_ratios() -> list[dict]:
    """LSQ's initial step ``2 mean|w| / sqrt(Qp)`` over the min/max step ``max|w| / Qp`` (median over the
    rows / groups) of MiniLM's weight matrices: why the recipes do not start int8 weights from LSQ."""
    model = SentenceEncoder()
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            w = mod.weight.detach().float()
            g32 = w.reshape(-1, 32).abs()
            r8 = (2 * w.abs().mean(1) / 127**0.5) / (w.abs().amax(1) / 127)
            r4 = (2 * g32.mean(1) / 7**0.5) / (g32.amax(1) / 7)
            rows.append({"name": name, "int8_per_row": float(r8.median()), "int4_g32": float(r4.median())})
    for r in rows:
        print(f"{r['name']:55s} int8 per row {r['int8_per_row']:5.2f}x   int4 g32 {r['int4_g32']:5.2f}x")
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'recipe':18s} {'mode':4s} {'cosine':>7s} {'agree':>6s} {'rt cos':>7s} {'rt agr':>6s} "
        f"{'rt~fq':>7s} {'rt-fq':>6s} {'deq-fq':>6s} {'int':>4s} {'MB':>5s} {'verif':>5s} {'wall s':>6s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['recipe']:18s} {r['mode']:4s} {r['cosine']:7.4f} {100 * r['agreement']:5.1f}% "
            f"{r['runtime_cosine']:7.4f} {100 * r['runtime_agreement']:5.1f}% "
            f"{r['runtime_vs_fakequant_cosine']:7.5f} {r['runtime_max_abs_diff']:6.0e} "
            f"{r['dequant_path_max_abs_diff']:6.0e} "
            f"{r['int_gemm_layers']:4d} {r['exported_bytes'] / 1e6:5.1f} "
            f"{'yes' if r['export_verified'] else 'no':>5s} {r['job_wall_s']:6.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_minilm"))
    parser.add_argument("--ablation", action="store_true", help="PTQ error by part of the model, then exit")
    parser.add_argument(
        "--scale-init", action="store_true", help="LSQ's initial weight step vs min/max, then exit"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run (after --)")
    args = parser.parse_args()
    if args.ablation:
        ablation(args.out)
        return
    if args.scale_init:
        scale_init_ratios()
        return
    out_json = args.out / "bench_minilm.json"
    # Rows of earlier invocations into the same directory are kept (replaced when re-run).
    rows: list[dict] = json.loads(out_json.read_text())["results"] if out_json.is_file() else []
    for recipe in args.recipes:
        for mode in args.modes:
            row = bench_one(recipe, mode, args.out, args.overrides)
            row["overrides"] = [*(PTQ_OVERRIDES.get(recipe, []) if mode == "ptq" else []), *args.overrides]
            rows = [r for r in rows if (r["recipe"], r["mode"]) != (recipe, mode)] + [row]
            rows.sort(key=lambda r: (RECIPES.index(r["recipe"]), MODES.index(r["mode"])))
            write_json_atomic(out_json, {"results": rows})
            print(table(rows), flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
