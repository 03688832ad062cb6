"""Byte-level language-modelling corpus made of the running Python's own standard library.

Every Python install carries a few MB of real source code, so this gives a text corpus with no download.
Everything is deterministic (sorted paths, seeded shuffle) and split by file, so no file leaks from
train into validation or test.
"""

from __future__ import annotations

import os
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from qat.data.common import SEPARATOR, SplitsDataModule, lm_collate, lm_dataset

SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


def stdlib_py_files(root: str | Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the stdlib: top-level modules plus packages, minus tests and tooling.

    Only directories that are packages (have ``__init__.py``) are entered, which skips things like
    ``config-3.x`` or ``venv/scripts``.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and (here / d / "__init__.py").is_file()
        )
        files.extend(here / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_utf8(path: Path) -> bytes | None:
    """File bytes, or None when the file is not valid UTF-8 (a few stdlib files are latin-1 on purpose)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def concat_files(paths: list[Path], max_bytes: int | None) -> tuple[bytes, list[Path]]:
    """Join files with a blank-line separator, stopping (and truncating) at ``max_bytes``.

    Returns the bytes and the files that actually contributed.
    """
    parts: list[bytes] = []
    used: list[Path] = []
    total = 0
    for path in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        data = read_utf8(path)
        if data is None:
            continue
        chunk = data + SEPARATOR
        parts.append(chunk)
        used.append(path)
        total += len(chunk)
    joined = b"".join(parts)
    return (joined[:max_bytes] if max_bytes is not None else joined), used


def split_files(
    files: list[Path], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Path]]:
    """Seeded shuffle, then cut into train/validation/test by file (each split gets at least one file)."""
    if len(files) < 3:
        raise ValueError(f"need at least 3 files to split, got {len(files)}")
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction))
    n_test = max(1, round(len(shuffled) * test_fraction))
    return {
        "validation": shuffled[:n_val],
        "test": shuffled[n_val : n_val + n_test],
        "train": shuffled[n_val + n_test :],
    }


class PyTextDataModule(SplitsDataModule):
    """Next-byte prediction over stdlib source; batches are ``(inputs [B,T] int64, targets [B,T] int64)``.

    ``targets`` is ``inputs`` shifted left by one byte. ``max_bytes`` caps the corpus size and is shared
    between the splits in proportion to their fractions.
    """

    vocab_size: int = 256

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        max_files: int | None = 400,
        max_bytes: int | None = 2_000_000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        stride: int | None = None,
        root: str | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, val_fraction, test_fraction)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
        self.seq_len = seq_len
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.stride = stride
        self.root = root
        self.split_files: dict[str, list[Path]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read, split and chunk the corpus once; later calls are no-ops."""
        if self.splits is not None:
            return
        files = stdlib_py_files(self.root)
        # Shuffle before capping so max_files takes a sample from the whole stdlib, not just "a*" modules.
        random.Random(self.seed).shuffle(files)
        if self.max_files is not None:
            files = files[: self.max_files]
        by_split = split_files(files, self.val_fraction, self.test_fraction, self.seed)
        fractions = {
            "train": 1.0 - self.val_fraction - self.test_fraction,
            "validation": self.val_fraction,
            "test": self.test_fraction,
        }
        splits = {}
        for name, paths in by_split.items():
            budget = None if self.max_bytes is None else int(self.max_bytes * fractions[name])
            data, self.split_files[name] = concat_files(paths, budget)
            splits[name] = lm_dataset(data, self.seq_len, self.stride)
            if len(splits[name]) == 0:
                raise ValueError(f"split {name!r} has fewer than seq_len+1={self.seq_len + 1} bytes")
        self.splits = datasets.DatasetDict(splits)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        return lm_collate
