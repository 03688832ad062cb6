"""Two CPU processes (gloo) under Lightning DDP end with identical weights and quantizer state, for every
scale source (observers: minmax, ema, percentile, mse; learned: lsq, lsq+ and pact), after the schedule froze
the observers, and after a resume.

The default run skips calibration (``calibration.batches=0``): learned scales then initialise on the first
training batch, which differs per rank, and the ranks agree only because that init is averaged across them.
A calibrated run sets the scales before DDP starts, on the same batches on every rank (slow test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.configs import ALL_SCALE_SOURCES

# State each source keeps, which the rank comparison must cover.
SOURCE_STATE = [
    "conv1.weight_quant.observer.max_val", "conv1.input_quant.observer.min_val",  # minmax
    "conv2.weight_quant.observer.max_val", "conv2.input_quant.observer.min_val",  # mse, percentile
    "conv3.weight_quant.scale", "conv3.input_quant.scale",  # lsq, pact
    "fc.weight_quant.observer.max_val", "fc.input_quant.zero_point",  # ema, lsq+
]  # fmt: skip


def ddp_run(out, *extra: str, cwd) -> dict:
    cmd = [
        sys.executable, "-m", "qat.cli.train", "trainer=ddp_cpu", "debug=fast", *ALL_SCALE_SOURCES,
        "schedule.freeze_observers_step=2", "schedule.freeze_bn_step=2", "export.enabled=false",
        "logger=none", "callbacks=none", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "ddp_consistency.json").read_text())


def model_state(out) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "qat" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def assert_identical_ranks(report: dict) -> None:
    assert report["world_size"] == 2
    assert report["mismatched"] == []
    digests = report["digests"]
    assert digests["0"] == digests["1"]
    for key in SOURCE_STATE:  # the check covered every source's quantizer state, not only weights
        assert f"model.{key}" in digests["0"], key


@pytest.mark.parametrize("calibration_batches", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_ddp_two_cpu_ranks_keep_identical_quantizer_state(tmp_path, calibration_batches):
    out = tmp_path / "ddp"
    assert_identical_ranks(ddp_run(out, f"calibration.batches={calibration_batches}", cwd=tmp_path))
    state = model_state(out)
    # The schedule froze the 5 observers at step 2 of 4: the ranks agree on the frozen state.
    flags = [k for k in state if k.endswith("observer_enabled")]
    observed = [k for k in flags if k.replace("_enabled", ".min_val") in state]
    assert len(observed) == 5 and all(int(state[k]) == 0 for k in observed)


@pytest.mark.slow
def test_ddp_ranks_stay_identical_after_a_resume(tmp_path):
    out = tmp_path / "ddp"
    ddp_run(out, cwd=tmp_path)
    first = model_state(out)
    report = ddp_run(out, "resume=true", "trainer.max_epochs=2", cwd=tmp_path)
    assert_identical_ranks(report)
    resumed = model_state(out)
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # it trained on after the resume
    for k in first:
        if k.endswith("observer_enabled"):
            assert torch.equal(first[k], resumed[k]), k  # frozen observers stay frozen
