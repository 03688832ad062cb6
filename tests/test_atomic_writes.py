"""Files the package writes are atomic: concurrent writers into one (sweep) directory never leave a reader
a torn file, and no temporary file survives."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qat.report.table import write_atomic
from qat.train.job import write_json_atomic, write_text_atomic

PAYLOAD = 200_000  # large enough that a plain write takes many syscalls, so a torn read is likely
ROUNDS = 40


def _content(writer: int, i: int) -> dict:
    return {"writer": writer, "round": i, "payload": str(writer) * PAYLOAD}


def _text(writer: int, i: int) -> str:
    return f"writer: {writer}\nround: {i}\npayload: {str(writer) * PAYLOAD}\n"


def _plain_write(path: Path, data: dict) -> None:
    """What the package must not do: open, truncate, write (a reader can see a partial file)."""
    with open(path, "w") as f:
        f.write(json.dumps(data))


def _writer(directory: str, writer: int, atomic: bool) -> None:
    d = Path(directory)
    for i in range(ROUNDS):
        data = _content(writer, i)
        if atomic:
            write_json_atomic(d / "metrics.json", data)
            write_text_atomic(d / "config.yaml", _text(writer, i))
            write_atomic(d / "report.md", _text(writer, i).encode())
        else:
            _plain_write(d / "metrics.json", data)


def _race(directory: Path, atomic: bool) -> tuple[int, int]:
    """Two writer processes and a reader; returns (reads, torn reads)."""
    ctx = mp.get_context("fork")  # the package is imported already: forked writers start at once
    procs = [ctx.Process(target=_writer, args=(str(directory), w, atomic)) for w in (1, 2)]
    for p in procs:
        p.start()
    reads = torn = 0
    names = ["metrics.json", "config.yaml", "report.md"] if atomic else ["metrics.json"]
    while any(p.is_alive() for p in procs):
        for name in names:
            path = directory / name
            if not path.exists():
                continue
            text = path.read_text()
            reads += 1
            torn += not _complete(name, text)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    return reads, torn


def _complete(name: str, text: str) -> bool:
    """The file holds exactly what one writer wrote in one round."""
    try:
        if name.endswith(".json"):
            data = json.loads(text)
            return data == _content(data["writer"], data["round"])
        head = yaml.safe_load("\n".join(text.split("\n")[:2]))
        return text == _text(head["writer"], head["round"])
    except (ValueError, KeyError, TypeError, yaml.YAMLError):
        return False


def test_two_processes_writing_the_same_files_never_tear_them(tmp_path):
    reads, torn = _race(tmp_path, atomic=True)
    assert reads > 0 and torn == 0
    for name in ("metrics.json", "config.yaml", "report.md"):
        assert _complete(name, (tmp_path / name).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.json", "report.md"]


def test_the_race_does_tear_plain_writes(tmp_path):
    """Control: the same race with open/truncate/write is caught tearing files (so the test above can
    fail). Timing-dependent, so a few attempts are allowed."""
    for _ in range(5):
        reads, torn = _race(tmp_path, atomic=False)
        if torn:
            return
    pytest.fail(f"no torn read in 5 races of plain writes ({reads} reads in the last)")


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # json cannot encode it, halfway through the dump
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.slow
def test_two_sweeps_into_one_sweep_directory(tmp_path):
    """Two ``qat-train -m`` processes with the same sweep directory (as two users or a requeued job might):
    their members land in separate subdirectories, every file is complete, and qat-report reads them."""
    sweep = tmp_path / "sweep"
    common = [
        "debug=fast", "export.enabled=false", "logger=none", "callbacks=none", "baseline.max_epochs=0",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    runs = [["quant=w8a8,w4a4"], ["quant=w2a2", "seed=1"]]
    procs = [
        subprocess.Popen([sys.executable, "-m", "qat.cli.train", "-m", *common, *r], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in runs
    ]  # fmt: skip
    t0 = time.time()
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    members = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(members) == 3, (members, time.time() - t0)
    for m in members:
        json.loads((m / "metrics.json").read_text())
        yaml.safe_load((m / "config.yaml").read_text())
    assert not list(sweep.rglob(".*.json.*")) and not list(sweep.rglob(".*.yaml.*"))
    report = subprocess.run(
        [sys.executable, "-m", "qat.cli.report", str(sweep)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-3000:]
