"""Files the package writes are atomic: a write stopped halfway (a full disk, a killed process) leaves the
old file whole, concurrent writers into one (sweep) directory never leave a reader a torn file, and no
temporary file survives."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qat
from qat.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from qat.report import collect, record_failure, write_report

PAYLOAD = 200_000  # large enough that a write takes many syscalls
ROUNDS = 40


def _content(writer: int, i: int) -> dict:
    return {"writer": writer, "round": i, "payload": str(writer) * PAYLOAD}


def _text(writer: int, i: int) -> str:
    return f"writer: {writer}\nround: {i}\npayload: {str(writer) * PAYLOAD}\n"


def _plain_write(path: Path, data: dict) -> None:
    """What the package must not do: open, truncate, write (a reader can see a partial file)."""
    with open(path, "w") as f:
        f.write(json.dumps(data))


def _writer(directory: str, writer: int) -> None:
    d = Path(directory)
    for i in range(ROUNDS):
        write_json_atomic(d / "metrics.json", _content(writer, i))
        write_text_atomic(d / "config.yaml", _text(writer, i))
        write_bytes_atomic(d / "report.md", _text(writer, i).encode())


def _race(directory: Path) -> tuple[int, int]:
    """Two writer processes and a reader; returns (reads, torn reads)."""
    ctx = mp.get_context("fork")  # the package is imported already: forked writers start at once
    procs = [ctx.Process(target=_writer, args=(str(directory), w)) for w in (1, 2)]
    for p in procs:
        p.start()
    reads = torn = 0
    names = ["metrics.json", "config.yaml", "report.md"]
    writing = True
    while writing:  # one last pass after the writers are done: at least one read of each file
        writing = any(p.is_alive() for p in procs)
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
    reads, torn = _race(tmp_path)
    assert reads > 0 and torn == 0
    for name in ("metrics.json", "config.yaml", "report.md"):
        assert _complete(name, (tmp_path / name).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.json", "report.md"]


def _interrupted(write, path: Path, limit: int = 4096) -> int:
    """Run ``write(path)`` in a child process whose files cannot grow past ``limit`` bytes (RLIMIT_FSIZE):
    the write stops at that byte with EFBIG, as on a full disk or a killed writer. Returns the child's exit
    code: 0 when the write failed that way, 2 when it did not fail."""

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write(path)
        except OSError as e:
            os._exit(0 if e.errno == errno.EFBIG else 1)
        os._exit(2)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    return proc.exitcode


def test_a_plain_write_stopped_halfway_leaves_a_torn_file(tmp_path):
    """Control: open/truncate/write stopped at byte 4096 leaves a file no reader can use, so the test below
    can fail."""
    path = tmp_path / "metrics.json"
    _plain_write(path, {"ok": 1})
    assert _interrupted(lambda p: _plain_write(p, _content(1, 0)), path) == 0
    assert path.stat().st_size == 4096 and not _complete("metrics.json", path.read_text())


@pytest.mark.parametrize("name", ["metrics.json", "config.yaml", "report.md"])
def test_an_atomic_write_stopped_halfway_leaves_the_old_file(tmp_path, name):
    """The same interruption of each atomic writer: the old file stays whole and no temporary is left."""
    path = tmp_path / name
    writers = {
        "metrics.json": (write_json_atomic, _content),
        "config.yaml": (write_text_atomic, _text),
        "report.md": (lambda p, text: write_bytes_atomic(p, text.encode()), _text),
    }
    write, content = writers[name]
    write(path, content(1, 0))
    old = path.read_bytes()
    assert _interrupted(lambda p: write(p, content(2, 1)), path) == 0
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [name]


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
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    members = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(members) == 3, members
    for m in members:
        json.loads((m / "metrics.json").read_text())
        yaml.safe_load((m / "config.yaml").read_text())
    assert not list(sweep.rglob(".*.json.*")) and not list(sweep.rglob(".*.yaml.*"))
    report = subprocess.run(
        [sys.executable, "-m", "qat.cli.report", str(sweep)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-3000:]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask):
    """Under umask 022 a plain open() makes 0644; mkstemp alone would leave 0600 (unreadable to a group
    sharing the run directory)."""
    with open(tmp_path / "plain", "w"):
        pass
    expected = _mode(tmp_path / "plain")
    assert expected == 0o666 & ~umask
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_text_atomic(tmp_path / "a.yaml", "x: 1\n")
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    record_failure(tmp_path / "run", ValueError("boom"))
    write_report(collect([tmp_path / "run"]), tmp_path / "report")
    written = [tmp_path / n for n in ("a.json", "a.yaml", "a.bin")] + [tmp_path / "run" / "metrics.json"]
    written += list((tmp_path / "report").iterdir())
    assert {p.name: _mode(p) for p in written} == {p.name: expected for p in written}


def test_export_directory_and_files_get_the_umask_modes(tmp_path, umask):
    torch.manual_seed(0)
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), {"weight": {"format": "int8"}})
    report = qat.export(model, tmp_path / "export", verify=False)
    out = Path(report.out_dir)
    assert _mode(out) == 0o777 & ~umask
    assert {p.name: _mode(p) for p in out.iterdir()} == {p.name: 0o666 & ~umask for p in out.iterdir()}


def test_a_failed_write_names_the_target_not_the_temporary(tmp_path):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "eval.json"  # its parent is a file: the temporary cannot be made
    with pytest.raises(OSError) as info:
        write_json_atomic(target, {"a": 1})
    assert str(target) in str(info.value) and ".eval.json." not in str(info.value)
