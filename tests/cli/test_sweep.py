"""Sweeps end to end: a real multirun with one failing member, qat-report over it, and the sweep, search and
launcher configs (sweep recipes, Optuna, SLURM via submitit) composing into valid runs."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.extras import require
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qat.cli.train import CONFIG_DIR, objective
from qat.report import collect
from qat.train.job import validate

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "qat.cli.train"]
REPORT = [sys.executable, "-m", "qat.cli.report"]
PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["debug=fast", "export.enabled=false"]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """fp32 and w4a4 run; w4g32 fails in prepare (group 32 does not divide conv1's 9 inputs)."""
    tmp = tmp_path_factory.mktemp("sweep")
    d = tmp / "multirun"
    proc = _run(
        [*TRAIN, "-m", "quant=fp32,w4g32,w4a4", "recipe=digits_w4a4", *FAST, f"hydra.sweep.dir={d}"], tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_a_failing_member_does_not_stop_the_sweep(sweep_dir):
    runs = sorted((p.name for p in sweep_dir.iterdir() if p.is_dir()), key=lambda n: int(n.split("_")[0]))
    assert [r.rsplit("quant=", 1)[1] for r in runs] == ["fp32", "w4g32", "w4a4"]
    failed = json.loads((sweep_dir / runs[1] / "metrics.json").read_text())
    assert failed["status"] == "failed" and "quant.weight.group_size: 32" in failed["error"]
    assert failed["config"]["quant"]["name"] == "w4g32"
    ok = json.loads((sweep_dir / runs[2] / "metrics.json").read_text())
    assert ok.get("status", "ok") == "ok" and ok["quant"] == "w4a4"


def test_the_search_objective_is_the_validation_metric(sweep_dir):
    """A run returns its primary metric on the validation split to the sweeper (Optuna), never the test
    figure that metrics.json and the report show."""
    assert objective({"primary_metric": "acc", "quantized": {"acc": 0.9, "val_acc": 0.7}}) == 0.7
    assert objective({"primary_metric": "ppl", "quantized": {"ppl": 3.0, "val_ppl": float("nan")}}) is None
    (w4a4,) = sweep_dir.glob("2_*quant=w4a4")
    metrics = json.loads((w4a4 / "metrics.json").read_text())
    assert {"acc", "val_acc"} <= set(metrics["quantized"]) and {"acc", "val_acc"} <= set(metrics["baseline"])
    assert objective(metrics) == metrics["quantized"]["val_acc"]


def test_report_over_the_sweep(sweep_dir, tmp_path):
    out = tmp_path / "rep"
    proc = _run([*REPORT, str(sweep_dir), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    got = [(r["run"], r["status"], r["method"], r["w_bits"], r["a_bits"]) for r in rows]
    assert got == [
        ("0_quant=fp32", "ok", "float", "", ""),
        ("1_quant=w4g32", "failed", "qat lsq", "4", ""),
        ("2_quant=w4a4", "ok", "qat lsq", "4", "4"),
    ]
    fp32, failed, w4a4 = rows
    assert fp32["compression_ratio"] == "1" and float(w4a4["compression_ratio"]) > 4
    assert w4a4["metric"] == "acc" and 0.0 <= float(w4a4["value"]) <= 1.0 and w4a4["delta_vs_float"] != ""
    assert failed["value"] == "" and "group_size" in failed["error"]
    for png in ("pareto.png", "curves.png"):
        assert (out / png).read_bytes().startswith(PNG)
    md = (out / "report.md").read_text()
    assert "3 runs: 2 ok, 1 failed." in md and md.count("\n| ") == 4  # header + 3 rows
    assert "2_quant=w4a4" in proc.stdout


def test_a_single_run_still_fails_loudly(tmp_path):
    bad = "quant.weight.group_size=7"  # per-channel weights take no group size: fails before training
    proc = _run([*TRAIN, "recipe=digits_w4a4", bad, *FAST, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 1
    assert "quant.weight.group_size: 7 is not valid" in proc.stderr
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "quantized" not in failed
    (rec,) = collect([tmp_path / "run"])  # qat-report lists it as failed, not as still running
    assert rec.status == "failed" and "quant.weight.group_size: 7 is not valid" in rec.error


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _members(params) -> list[list[str]]:
    """Every combination of a ``hydra.sweeper.params`` mapping, as override lists."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(c) for c in itertools.product(*choices)]


@pytest.mark.parametrize(("recipe", "n_runs"), [("sweep_digits_bits_methods", 12), ("sweep_pytext_bits", 4)])
def test_sweep_recipes_expand_into_valid_runs(recipe, n_runs):
    params = _compose(f"recipe={recipe}").hydra.sweeper.params
    members = _members(params)
    assert len(members) == n_runs
    for overrides in members:
        cfg = _compose(f"recipe={recipe}", *overrides)
        validate(cfg)  # raises QuantConfigError / JobConfigError for a member that could never run
        for o in overrides:
            key, value = o.split("=", 1)
            assert str(cfg.quant.name if key == "quant" else OmegaConf.select(cfg, key)) == value


def test_optuna_search_composes():
    require("hydra_plugins.hydra_optuna_sweeper", extra="sweeps")
    cfg = _compose("hparams_search=digits_w4a4_lr")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optim.optimizer.lr", "optim.scale_lr_mult"}
    assert cfg.quant.name == "w4a4"  # the bit width is fixed: only the learning rates move
    validate(cfg)


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path):
    require("hydra_plugins.hydra_optuna_sweeper", extra="sweeps")
    d = tmp_path / "search"
    cmd = [
        *TRAIN,
        "-m",
        "hparams_search=digits_w4a4_lr",
        *FAST,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={d}",
    ]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = OmegaConf.load(d / "optimization_results.yaml")
    assert set(results.best_params) == {"optim.optimizer.lr", "optim.scale_lr_mult"}
    trials = [json.loads(p.read_text())["quantized"] for p in d.glob("*/metrics.json")]
    assert len(trials) == 2
    assert results.best_value == max(q["val_acc"] for q in trials)  # the validation metric was optimised


def test_slurm_launcher_follows_the_trainer_shape():
    require("hydra_plugins.hydra_submitit_launcher", extra="sweeps")
    from hydra.utils import instantiate

    shape = ("trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4", "hydra.sweep.dir=/tmp/qat-sweep")
    cfg = _compose("hydra/launcher=slurm", *shape)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert instantiate(cfg.hydra.launcher).params["nodes"] == 2  # builds without a cluster; submits nothing


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_tiny_sweep(tmp_path):
    require("hydra_plugins.hydra_submitit_launcher", extra="sweeps")
    d = tmp_path / "sub"
    cmd = [*TRAIN, "-m", "hydra/launcher=submitit_local", "quant=fp32,w4a4", *FAST, f"hydra.sweep.dir={d}"]
    proc = _run(cmd, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(d.glob("*/metrics.json"))) == 2
