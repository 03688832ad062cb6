"""The README's "Your own data" examples, run exactly as written, in an empty directory, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_examples() -> list[list[str]]:
    """The command lines of each ```bash block of the README section "## Your own data"."""
    text = README.read_text()
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_the_section_has_a_csv_and_a_text_example():
    commands = [" ".join(block) for block in readme_examples()]
    assert len(commands) == 3
    assert "model=mlp" in commands[0] and "task=lm" in commands[1] and "data.tokenizer=" in commands[2]


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=name, marks=() if name == "csv" else pytest.mark.slow)  # text: ~20 s each
        for block, name in zip(readme_examples(), ["csv", "text_lm", "text_classification"], strict=True)
    ],
)
def test_readme_example_runs_as_typed(tmp_path, block):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # where qat-train lives
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_cache")  # keep the user's cache clean
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
    for command in block:
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    [metrics_file] = list((tmp_path / "outputs").rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    metric = metrics["primary_metric"]
    assert metric in metrics["baseline"] and metric in metrics["quantized"]
    assert metrics["export"]["verification"]["top1_agreement"] == 1.0
