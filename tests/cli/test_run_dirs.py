"""Where runs land: named after the recipe (or <data>_<quant> without one), from any directory, for single
runs and sweeps alike, with the shipped defaults (no hydra.run.dir / hydra.sweep.dir on the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qat.cli._app import hydra_argv
from qat.cli.train import CONFIG_DIR, run_name

BIN = Path(sys.executable).parent


def _qat_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "QAT_DRY_RUN": "1"}
    return subprocess.run(["qat-train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_run_name_is_the_recipe_or_data_and_quant():
    assert run_name(OmegaConf.create({"recipe": "digits_w4a4", "data": "digits", "quant": "w4a4"})) == (
        "digits_w4a4"
    )
    assert run_name(OmegaConf.create({"data": "hf", "quant": "w8a8"})) == "hf_w8a8"  # ~recipe
    assert run_name(OmegaConf.create({"recipe": None, "data": "hf", "quant": "w8a8"})) == "hf_w8a8"


def test_group_null_deletes_the_default_instead_of_a_hydra_traceback():
    argv = ["recipe=null", "quant=w8a8", "debug=null", "data.seed=null", "hydra/launcher=null"]
    assert hydra_argv(argv) == ["~recipe", "quant=w8a8", "~debug", "data.seed=null", "hydra/launcher=null"]


def test_a_mapping_for_a_null_side_turns_it_on(make_cfg):
    """OmegaConf cannot merge a mapping into a typed node that is null: ``a.b={...}`` goes to Hydra as
    ``a={b: {...}}`` (sweeps, additions and other values are passed as typed)."""
    argv = ["quant.activation={format: int8}", "+quant.overrides.fc={weight: null}", "quant.weight.axis=0,1"]
    assert hydra_argv(argv) == ["quant={activation:{format:int8}}", *argv[1:]]
    cfg = make_cfg("quant=w4g32", "quant.activation={format: int8}", "quant.activation.symmetric=false")
    assert (cfg.quant.activation.format, cfg.quant.activation.symmetric) == ("int8", False)
    assert cfg.quant.activation.percentile == 99.99  # the rest from QuantSpec's defaults: typed, overridable


def test_a_sweep_and_a_run_without_a_recipe_land_under_their_names(tmp_path):
    """The README sweep failed with 'HydraConfig was not set' (hydra.sweep.dir); recipe=null gave a Hydra
    traceback, and '~recipe' put the run in outputs/None/."""
    sweep = _qat_train("-m", "quant=w8a8,w4a4", "debug=fast", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    (stamp,) = (tmp_path / "multirun" / "digits_w4a4").iterdir()
    members = sorted(p.name for p in stamp.iterdir() if p.is_dir())
    assert members == ["0_quant=w8a8", "1_quant=w4a4"]  # debug=fast is not repeated in every member name
    single = _qat_train("recipe=null", "quant=w8a8", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["digits_w8a8"]


@pytest.mark.slow
def test_every_recipe_and_search_runs_as_a_multirun_with_the_shipped_defaults(tmp_path):
    """One multirun over every recipe (sweep recipes and the Optuna search each as their own multirun),
    dry: each member composes, validates, loads its data and runs one batch; none is recorded failed."""
    recipes = sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
    plain = [r for r in recipes if not r.startswith("sweep_")]
    runs = [("-m", f"recipe={','.join(plain)}")]
    runs += [("-m", f"recipe={r}", "debug=fast") for r in recipes if r.startswith("sweep_")]
    runs += [("-m", "hparams_search=digits_w4a4_lr", "hydra.sweeper.n_trials=2")]
    for args in runs:
        proc = _qat_train(*args, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "error:" not in proc.stderr, (args, proc.stderr[-2000:])
    assert not [p for p in (tmp_path / "multirun").rglob("metrics.json") if "failed" in p.read_text()]
    members = [p for p in (tmp_path / "multirun").glob("*/*/*") if p.is_dir()]
    assert len(members) >= len(plain) + 12 + 4 + 2
