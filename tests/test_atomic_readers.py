"""A reader never sees half a file, shown without a race: a file that a reader opened before a rewrite keeps
giving that reader the complete old version (the new version is a new file renamed into place), and the
next reader gets the complete new one. A write in place (open, truncate, write) fails this every time; the
race tests in ``test_atomic_writes.py`` show the same under real concurrency."""

from __future__ import annotations

import json

from qat.io import write_bytes_atomic, write_json_atomic


def test_an_open_reader_keeps_the_complete_old_json(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"round": 1, "payload": "a" * 100})
    with open(path) as reader:  # a reader part-way through the file when the rewrite happens
        start = reader.read(10)
        write_json_atomic(path, {"round": 2, "payload": "b" * 1000})
        assert json.loads(start + reader.read()) == {"round": 1, "payload": "a" * 100}
    assert json.loads(path.read_text()) == {"round": 2, "payload": "b" * 1000}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_an_open_reader_keeps_the_complete_old_bytes(tmp_path):
    path = tmp_path / "model.bin"
    write_bytes_atomic(path, bytes(range(256)) * 4)
    with open(path, "rb") as reader:
        start = reader.read(300)
        write_bytes_atomic(path, b"\xff" * 2000)
        assert start + reader.read() == bytes(range(256)) * 4
    assert path.read_bytes() == b"\xff" * 2000
