"""``qat-train trainer=fsdp_cpu``: the whole job on two CPU processes (gloo) under FSDP2.

The ranks end with identical weights and quantizer state for every scale source, the QAT checkpoint is
sharded (a directory, one file per rank), the export written at the end of the sharded run has the
tensors and metadata of a single-process export of the checkpoint's state, and (slow) a run killed
mid-QAT and resumed from its sharded checkpoint ends with the uninterrupted run's metrics."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.configs import ALL_SCALE_SOURCES
from safetensors import safe_open

from qat import runs
from qat.deploy import export
from qat.train.monitor import config_from_checkpoint

HERE = Path(__file__).resolve().parent
BASE = [
    "trainer=fsdp_cpu", "debug=fast", "logger=none", "callbacks=none", "calibration.batches=2",
    "schedule.freeze_observers_step=2", "export.latency=[]",
]  # fmt: skip


def fsdp_run(out: Path, *extra: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "qat.cli.train", *BASE, *extra, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == rc, proc.stderr[-3000:]
    return proc


def test_fsdp_job_on_two_ranks(tmp_path):
    out = tmp_path / "fsdp"
    fsdp_run(out, *ALL_SCALE_SOURCES, cwd=tmp_path)
    report = json.loads(runs.consistency_file(out).read_text())
    assert report["world_size"] == 2 and report["mismatched"] == []
    assert report["digests"]["0"] == report["digests"]["1"]
    for key in ("conv2.input_quant.observer.min_val", "conv3.input_quant.scale", "fc.input_quant.zero_point"):
        assert f"model.{key}" in report["digests"]["0"], key

    ckpt = runs.checkpoint_file(out, "qat")
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # sharded: one file per rank
    assert config_from_checkpoint(ckpt)["quant"]["weight"]["format"] == "int8"  # qat-export ckpt=<dir>

    # The export of the sharded run == a single-process export of the same (checkpointed) state.
    run = runs.load_run(out)
    run.datamodule.setup("fit")
    batches = list(itertools.islice(run.datamodule.val_dataloader(), 2))
    export(run.model, tmp_path / "single", batches=batches, task=run.task)
    with safe_open(runs.export_dir(out) / "model.safetensors", "pt") as f:
        sharded = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    with safe_open(tmp_path / "single" / "model.safetensors", "pt") as f:
        single = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    assert sharded[1] == single[1]  # the quant config's digest among them
    assert sharded[0].keys() == single[0].keys()
    for k, v in single[0].items():
        assert torch.equal(sharded[0][k], v), k


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    common = [
        "quant=w8a8", "export.enabled=false", "trainer.limit_train_batches=4",
        "checkpoint.every_n_train_steps=2",
    ]  # fmt: skip
    kill = [
        "+callbacks.kill._target_=_faults.KillAt", "+callbacks.kill.phase=qat", "+callbacks.kill.step=3",
        "+callbacks.kill.how=sigkill",
    ]  # fmt: skip
    out = tmp_path / "run"
    fsdp_run(out, *common, *kill, cwd=tmp_path, rc=-9)
    ckpt = runs.checkpoint_file(out, "qat")
    assert torch.load(ckpt / "meta.pt", weights_only=True)["global_step"] == 2
    assert not runs.metrics_file(out).exists()
    fsdp_run(out, *common, "resume=true", cwd=tmp_path)
    fsdp_run(tmp_path / "reference", *common, cwd=tmp_path)
    resumed = json.loads(runs.metrics_file(out).read_text())
    reference = json.loads(runs.metrics_file(tmp_path / "reference").read_text())
    for part in ("baseline", "quantized"):
        assert resumed[part].keys() == reference[part].keys()
        for key, value in reference[part].items():
            assert abs(resumed[part][key] - value) <= 1e-6, (part, key, resumed[part][key], value)
    print(
        "resume equality:",
        {k: (resumed["quantized"][k], reference["quantized"][k]) for k in reference["quantized"]},
    )
