"""Atomic writes: a temporary file (or directory) beside the target, renamed into place.

Readers (``qat-report`` on a live sweep, a second writer in the same directory) never see half a file or
half an export directory, and a failed write leaves the old one and no temporary behind. What is written
gets the mode a plain ``open()`` / ``mkdir()`` would give it under the current umask (``tempfile`` alone
makes files 0600 and directories 0700).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` where Linux has it (reading it through ``os.umask``
    means setting it, which another thread could observe in between)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) gives a new file or directory under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not the temporary one
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_mode())
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for text (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """:func:`write_bytes_atomic` for JSON (indented; numbers json cannot encode are written as floats)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=float))


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling directory of ``out`` to fill, renamed onto ``out`` when the block ends without
    an error (an existing ``out`` is replaced, see :func:`replace_directory`) and removed when it fails:
    ``out`` appears complete or not at all (parent directories are created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` directory is moved aside first and deleted only after
    the rename (renaming onto an empty directory is allowed on POSIX, onto a full one is not)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{out} is a file, not a directory", str(out))
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
