"""Two CPU processes (gloo) under Lightning DDP end with identical weights and quantizer state."""

from __future__ import annotations

import json
import subprocess
import sys


def test_ddp_two_cpu_ranks_keep_identical_quantizer_state(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "qat.cli.train", "trainer=ddp_cpu", "debug=fast", "quant=w8a8",
        "schedule.freeze_observers_step=2", "schedule.freeze_bn_step=2", "export.enabled=false",
        "logger=none", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "ddp_consistency.json").read_text())
    assert report["world_size"] == 2
    assert report["mismatched"] == []
    digests = report["digests"]
    # The check must have covered quantizer state (scales, observer ranges), not only weights.
    keys = set(digests["0"])
    assert any("input_quant.observer.min_val" in k for k in keys)
    assert any("weight_quant.scale" in k for k in keys)
    assert digests["0"] == digests["1"]
