"""End-to-end runs of the main job (tiny limits), metrics.json, resume, and bad-config failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat.conf import CONFIG_DIR
from qat.config import QuantConfigError
from qat.quant.quantizer import FakeQuantizer
from qat.runs import load_run
from qat.train.job import JobConfigError, run

REPO = Path(__file__).resolve().parents[2]
# The default suite runs one recipe per data set end to end; every other recipe runs with -m slow (each one
# still composes and validates in tests/test_configs.py).
FAST_RECIPES = {"digits_w4a4", "pytext_w4g32a8dyn"}
PLAIN_RECIPES = sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
PLAIN_RECIPES = [r for r in PLAIN_RECIPES if not r.startswith("sweep")]
assert FAST_RECIPES < set(PLAIN_RECIPES), f"recipes not found in {CONFIG_DIR}"
RECIPES = [r if r in FAST_RECIPES else pytest.param(r, marks=pytest.mark.slow) for r in PLAIN_RECIPES]
FAST = ("debug=fast", "export.enabled=false", "logger=none")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_end_to_end(make_cfg, recipe):
    cfg = make_cfg(f"recipe={recipe}", *FAST, "data.batch_size=16")
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["primary_metric"] == metrics["primary_metric"]
    m = metrics["primary_metric"]
    assert m in metrics["baseline"] and m in metrics["quantized"]
    assert metrics["size_bytes"]["quantized"] <= metrics["size_bytes"]["baseline"]
    assert isinstance(metrics["higher_is_better"], bool) and metrics["config"]["task"] == cfg.task


def test_metrics_json_shape_and_quantized_is_smaller(make_cfg):
    cfg = make_cfg(*FAST)
    metrics = run(cfg)
    keys = {"primary_metric", "higher_is_better", "baseline", "quantized", "size_bytes", "config"}
    assert set(metrics) >= keys
    assert metrics["primary_metric"] == "acc" and metrics["higher_is_better"] is True
    # W4A4 with 8-bit first/last layers: well under a quarter of the float32 bytes.
    assert metrics["size_bytes"]["quantized"] < metrics["size_bytes"]["baseline"] / 4
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "qat" / "last.ckpt").exists()


def test_ptq_mode_does_not_train(make_cfg):
    cfg = make_cfg("mode=ptq", *FAST)
    metrics = run(cfg)
    assert metrics["mode"] == "ptq"
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "qat" / "last.ckpt").exists()


def test_fp32_quant_keeps_the_float_model(make_cfg):
    metrics = run(make_cfg("quant=fp32", *FAST))
    assert metrics["quantized"] == metrics["baseline"] and metrics["mode"] == "float"


def test_checkpoint_restores_quantizer_state_exactly(make_cfg):
    cfg = make_cfg(*FAST, "schedule.freeze_observers_step=2", "quant=w8a8")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    ckpt = torch.load(out / "checkpoints" / "qat" / "last.ckpt", map_location="cpu", weights_only=True)
    restored = load_run(out)
    state = restored.model.state_dict()
    saved = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert saved.keys() == state.keys()
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k
    qs = [m for m in restored.model.modules() if isinstance(m, FakeQuantizer)]
    assert qs and all(q.fake_quant_on for q in qs)
    # Observers were frozen at step 2 by the schedule: the restored python mirrors must agree.
    assert all(not q.observer_on for q in qs if q.observer is not None)


def test_resume_from_qat_checkpoint_continues(make_cfg):
    first = make_cfg(*FAST, sub="first")
    run(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "qat" / "last.ckpt"
    step_before = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    second = make_cfg(*FAST, f"ckpt_path={ckpt}", "trainer.max_epochs=2", sub="second")
    metrics = run(second)
    out2 = Path(second.paths.output_dir)
    step_after = torch.load(out2 / "checkpoints" / "qat" / "last.ckpt", map_location="cpu", weights_only=True)
    assert step_after["global_step"] > step_before
    # The float baseline is taken from the resumed run, not retrained.
    assert json.loads((out2 / "baseline.json").read_text()) == metrics["baseline"]
    assert not (out2 / "checkpoints" / "float").exists()


@pytest.mark.parametrize(
    "override,error,needle",
    [
        ("mode=train", JobConfigError, "mode: 'train' is not valid; allowed: qat, ptq"),
        ("quant.weight.format=int9", QuantConfigError, "quant.weight.format: 'int9'"),
        ("quant.weight.granularity=per_row", QuantConfigError, "allowed: per_tensor, per_channel"),
        ("task=segmentation", JobConfigError, "allowed: classification, lm"),
    ],
)
def test_bad_values_fail_fast_naming_the_key(make_cfg, override, error, needle):
    with pytest.raises(error, match=None) as info:
        run(make_cfg(override, *FAST))
    assert needle in str(info.value)


@pytest.mark.slow  # tests/test_errors.py runs the same kind of cases through the CLI by default
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    cases = [
        (["quant.weight.format=int9"], "quant.weight.format: 'int9' is not valid; allowed: int2"),
        (["quant=w9a9"], "quant: 'w9a9' is not valid; allowed: binary, "),
        (["no_such_key=1"], "no_such_key"),
    ]
    for args, needle in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "qat.cli.train", *args, f"hydra.run.dir={tmp_path / 'x'}", "debug=fast"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode != 0, args
        assert needle in proc.stderr, proc.stderr[-2000:]
