import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qat.data.hf import HFDataModule


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": labels})


def _cache(tmp_path: Path) -> dict[str, str]:
    """Keep datasets' Arrow cache inside the test's tmp dir."""
    return {"cache_dir": str(tmp_path / "hf_cache")}


def test_csv_classification_with_scalar_columns(tmp_path: Path) -> None:
    _table(60, 0).to_csv(tmp_path / "train.csv", index=False)
    _table(20, 1).to_csv(tmp_path / "val.csv", index=False)
    _table(20, 2).to_csv(tmp_path / "test.csv", index=False)
    files = {s: str(tmp_path / f"{s}.csv") for s in ("train", "val", "test")}
    dm = HFDataModule(
        "csv",
        data_files={"train": files["train"], "validation": files["val"], "test": files["test"]},
        input_columns=["a", "b"],
        test_split="test",
        batch_size=8,
        load_kwargs=_cache(tmp_path),
    )
    assert dm.num_classes == 3
    assert dm.input_shape == (2,)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert len(dm.splits["validation"]) == 20 and len(dm.splits["test"]) == 20
    xt, _ = next(iter(dm.test_dataloader()))
    expected = _table(20, 2)[["a", "b"]].to_numpy(dtype=np.float32)[:8]
    assert torch.allclose(xt, torch.tensor(expected))


def test_parquet_list_column_with_string_labels_and_carved_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"vec": [rng.normal(size=5).tolist() for _ in range(50)], "y": ["cat", "dog"] * 25})
    frame.to_parquet(tmp_path / "train.parquet")
    kwargs = dict(
        path="parquet",
        data_files={"train": str(tmp_path / "train.parquet")},
        input_columns=["vec"],
        label_column="y",
        val_fraction=0.2,
        seed=5,
        batch_size=4,
        load_kwargs=_cache(tmp_path),
    )
    dm = HFDataModule(**kwargs)
    assert dm.num_classes == 2 and dm.input_shape == (5,)
    assert len(dm.splits["train"]) == 40 and len(dm.splits["validation"]) == 10
    x, y = next(iter(dm.calibration_dataloader()))
    assert x.shape == (4, 5) and set(y.tolist()) <= {0, 1}

    again = HFDataModule(**kwargs)
    again.setup()
    assert torch.equal(dm.splits["validation"]["x"][:], again.splits["validation"]["x"][:])
    with pytest.raises(ValueError, match="test_split"):
        dm.test_dataloader()


def test_json_lm_batches(tmp_path: Path) -> None:
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"document {i}: naïve café " * 4}) + "\n")
    dm = HFDataModule(
        "json",
        data_files={"train": str(tmp_path / "train.jsonl")},
        task="lm",
        seq_len=16,
        batch_size=4,
        load_kwargs=_cache(tmp_path),
    )
    assert dm.vocab_size == 256
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(dm.splits["validation"]) > 0
    with pytest.raises(AttributeError, match="classification"):
        _ = dm.num_classes


def test_text_lm_restores_lines(tmp_path: Path) -> None:
    lines = [f"line {i} of the file" for i in range(50)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "val.txt").write_text("\n".join(lines[:10]))
    dm = HFDataModule(
        "text",
        data_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")},
        task="lm",
        seq_len=20,
        batch_size=2,
        load_kwargs=_cache(tmp_path),
    )
    x, y = next(iter(dm.val_dataloader()))
    first = bytes(torch.cat([x[0], y[0, -1:]]).tolist()).decode()
    assert first == "\n".join(lines[:10])[:21]


def test_missing_column_error_names_column_and_available(tmp_path: Path) -> None:
    _table(20, 0).to_csv(tmp_path / "train.csv", index=False)
    files = {"train": str(tmp_path / "train.csv")}
    dm = HFDataModule("csv", data_files=files, input_columns=["a", "nope"], load_kwargs=_cache(tmp_path))
    with pytest.raises(ValueError, match=r"'nope'.*available columns: \['a', 'b', 'label'\]"):
        dm.setup()
    lm = HFDataModule("csv", data_files=files, task="lm", load_kwargs=_cache(tmp_path))
    with pytest.raises(ValueError, match=r"'text'.*available columns"):
        lm.setup()
