"""Generic datamodule over ``datasets.load_dataset``: local parquet/csv/json/text files or a hub dataset.

It lets a config point QAT at new data without new code. Two tasks are supported, with the same batch
shapes as the built-in datamodules:

* ``classification``: ``(x float32 [B, ...], y int64 [B])``; features come from several numeric columns
  (stacked into ``[B, F]``) or one column holding a list/array per row.
* ``lm``: ``(inputs int64 [B, T], targets int64 [B, T])``; ``text_column`` is encoded as UTF-8 bytes
  (vocab 256), rows joined per split with ``separator`` (default newline, which restores files read by
  the ``text`` builder one line per row) and chunked into ``seq_len + 1`` windows like ``PyTextDataModule``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from qat.data.common import classification_collate, lm_collate, lm_dataset


def _plain(value: Any) -> Any:
    """Turn Hydra's DictConfig/ListConfig (or any mapping/sequence) into dicts/lists that datasets accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _require_columns(ds: datasets.Dataset, columns: list[str], split: str) -> None:
    """Fail early with the missing column and what is available, instead of a KeyError deep in a loader."""
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(
                f"column {column!r} not found in split {split!r}; available columns: {ds.column_names}"
            )


class HFDataModule(L.LightningDataModule):
    """LightningDataModule over any ``datasets.load_dataset`` source, for classification or byte-level LM.

    Example: ``HFDataModule("csv", data_files={"train": "train.csv"}, input_columns=["a", "b"])``.
    When ``val_split`` is absent it is carved out of the train split with ``seed``.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        task: Literal["classification", "lm"] = "classification",
        input_columns: list[str] | None = None,
        label_column: str = "label",
        num_classes: int | None = None,
        text_column: str = "text",
        separator: str = "\n",
        seq_len: int = 128,
        stride: int | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("classification", "lm"):
            raise ValueError(f"task must be 'classification' or 'lm', got {task!r}")
        self.path = path
        self.name = name
        self.data_files = _plain(data_files)
        self.task = task
        self.input_columns = _plain(input_columns)
        self.label_column = label_column
        self._num_classes = num_classes
        self.text_column = text_column
        self.separator = separator
        self.seq_len = seq_len
        self.stride = stride
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.load_kwargs = _plain(load_kwargs) or {}
        self.vocab_size = 256
        self.input_shape: tuple[int, ...] | None = None
        self.splits: dict[str, datasets.Dataset] | None = None

    @property
    def num_classes(self) -> int:
        """Given in the constructor, or inferred from the labels (number of names, or max label + 1)."""
        if self.task != "classification":
            raise AttributeError("num_classes is only defined for task='classification'; use vocab_size")
        self.setup()
        assert self._num_classes is not None
        return self._num_classes

    def setup(self, stage: str | None = None) -> None:
        """Load, split and convert the data once; later calls are no-ops."""
        if self.splits is not None:
            return
        raw = datasets.load_dataset(self.path, self.name, data_files=self.data_files, **self.load_kwargs)
        if not isinstance(raw, datasets.DatasetDict):
            raise TypeError(f"expected a DatasetDict from load_dataset, got {type(raw).__name__}")
        if self.train_split not in raw:
            raise ValueError(f"split {self.train_split!r} not found; available splits: {list(raw)}")
        splits = {"train": raw[self.train_split]}
        if self.val_split in raw:
            splits["validation"] = raw[self.val_split]
        else:
            carved = splits["train"].train_test_split(test_size=self.val_fraction, seed=self.seed)
            splits = {"train": carved["train"], "validation": carved["test"]}
        if self.test_split is not None:
            if self.test_split not in raw:
                raise ValueError(f"split {self.test_split!r} not found; available splits: {list(raw)}")
            splits["test"] = raw[self.test_split]

        if self.task == "lm":
            self.splits = {name: self._to_lm(ds, name) for name, ds in splits.items()}
        else:
            self.splits = self._to_classification(splits)

    def _to_lm(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        _require_columns(ds, [self.text_column], split)
        texts = [t for t in ds[self.text_column][:] if t is not None]
        data = self.separator.encode("utf-8").join(t.encode("utf-8") for t in texts)
        out = lm_dataset(data, self.seq_len, self.stride)
        if len(out) == 0:
            raise ValueError(f"split {split!r} has fewer than seq_len+1={self.seq_len + 1} bytes of text")
        return out

    def _to_classification(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        train = splits["train"]
        input_columns = self.input_columns or [c for c in train.column_names if c != self.label_column]
        for name, ds in splits.items():
            _require_columns(ds, [*input_columns, self.label_column], name)

        # String labels become class ids with one shared, sorted vocabulary across splits.
        label_feature = train.features[self.label_column]
        names: list[str] | None = None
        if isinstance(label_feature, datasets.ClassLabel):
            names = label_feature.names
        elif getattr(label_feature, "dtype", None) in ("string", "large_string"):
            names = sorted({v for ds in splits.values() for v in ds[self.label_column][:]})

        converted = {}
        max_label = 0
        for name, ds in splits.items():
            labels = ds[self.label_column][:]  # [:] reads the whole column at once (fast path)
            if names is not None and not isinstance(label_feature, datasets.ClassLabel):
                index = {n: i for i, n in enumerate(names)}
                labels = [index[v] for v in labels]
            label_array = np.asarray(labels, dtype=np.int64)
            max_label = max(max_label, int(label_array.max(initial=0)))
            x = self._features(ds, input_columns)
            converted[name] = datasets.Dataset.from_dict({"x": x, "label": label_array})
            converted[name].set_format("torch")

        if self._num_classes is None:
            self._num_classes = len(names) if names is not None else max_label + 1
        self.input_shape = tuple(converted["train"][0]["x"].shape)
        return converted

    @staticmethod
    def _features(ds: datasets.Dataset, columns: list[str]) -> np.ndarray:
        """One list/array column is used as is; several scalar columns are stacked into ``[N, F]``."""
        numpy_ds = ds.with_format("numpy")
        # Column[:] converts the whole Arrow column in one go; iterating a Column is ~100x slower.
        if len(columns) == 1:
            return np.asarray(numpy_ds[columns[0]][:], dtype=np.float32)
        return np.stack([np.asarray(numpy_ds[c][:], dtype=np.float32) for c in columns], axis=1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.splits is not None
        if split not in self.splits:
            raise ValueError(f"no {split!r} split: set test_split to a split name of the dataset")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=lm_collate if self.task == "lm" else classification_collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a seeded generator, so runs are reproducible."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """Train split in a fixed order, for observer/range calibration before QAT."""
        return self._loader("train", shuffle=False)
