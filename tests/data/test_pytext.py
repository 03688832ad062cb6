from pathlib import Path

import torch

from qat.data.common import chunk_bytes
from qat.data.pytext import PyTextDataModule, stdlib_py_files


def _fake_stdlib(root: Path) -> Path:
    """A tiny stand-in for the stdlib with every kind of directory the file filter must handle."""
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "x = 1\n",
        "json/decoder.py": "y = 2\n",
        "json/tests/__init__.py": "",
        "test/__init__.py": "",
        "test/test_os.py": "",
        "idlelib/__init__.py": "",
        "lib2to3/__init__.py": "",
        "site-packages/pkg/__init__.py": "",
        "venv/scripts/activate.py": "",  # not a package: skipped
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "latin.py").write_bytes(b"# caf\xe9\n")  # not UTF-8
    return root


def test_file_filter_skips_tests_tooling_and_non_packages(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path)
    rel = [p.relative_to(root).as_posix() for p in stdlib_py_files(root)]
    assert rel == ["json/__init__.py", "json/decoder.py", "latin.py", "os.py"]


def test_real_stdlib_has_no_test_or_site_packages_files() -> None:
    files = stdlib_py_files()
    assert len(files) > 100
    skipped = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    assert not any(skipped & set(p.parts) for p in files)
    assert files == sorted(files)


def test_chunk_bytes_windows() -> None:
    chunks = chunk_bytes(bytes(range(10)), seq_len=3)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    overlapping = chunk_bytes(bytes(range(10)), seq_len=3, stride=3)
    assert overlapping.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunk_bytes(b"ab", seq_len=3).shape == (0, 4)


def test_batches_are_shifted_byte_pairs() -> None:
    dm = PyTextDataModule(seq_len=32, batch_size=8, max_files=60, max_bytes=200_000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 32) and y.shape == (8, 32)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < dm.vocab_size == 256
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.calibration_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.shape[1] == 32 and torch.equal(xb[:, 1:], yb[:, :-1])


def test_split_by_file_is_disjoint_and_deterministic() -> None:
    kwargs = dict(seq_len=64, max_files=80, max_bytes=300_000)
    a, b = PyTextDataModule(seed=3, **kwargs), PyTextDataModule(seed=3, **kwargs)
    a.setup()
    b.setup()
    assert a.split_files == b.split_files
    train, val, test = (set(a.split_files[s]) for s in ("train", "validation", "test"))
    assert train and val and test
    assert not (train & val or train & test or val & test)
    for split in ("train", "validation", "test"):
        assert torch.equal(a.splits[split]["input_ids"][:], b.splits[split]["input_ids"][:])
    xa, _ = next(iter(a.train_dataloader()))
    xb, _ = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb)

    c = PyTextDataModule(seed=4, **kwargs)
    c.setup()
    assert c.split_files["train"] != a.split_files["train"]


def test_max_bytes_caps_each_split_proportionally() -> None:
    dm = PyTextDataModule(seq_len=127, max_files=None, max_bytes=100_000)
    dm.setup()
    n_bytes = {s: len(ds) * 128 for s, ds in dm.splits.items()}
    assert n_bytes["train"] <= 80_000 and n_bytes["validation"] <= 10_000 and n_bytes["test"] <= 10_000
    assert n_bytes["train"] > 70_000


def test_default_build_is_capped() -> None:
    """What keeps the default build quick: at most 400 files and 2 MB are read, and still >1000 windows."""
    dm = PyTextDataModule()
    dm.setup()
    assert sum(len(files) for files in dm.split_files.values()) <= 400
    assert sum(len(ds) * 129 for ds in dm.splits.values()) <= 2_000_000
    assert len(dm.splits["train"]) > 1000
