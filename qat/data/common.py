"""What the datamodules share: the base class with their loaders, batch collation and byte-level chunking.

Collate functions live at module level so DataLoader workers can pickle them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

SEPARATOR = b"\n\n"


def classification_collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn rows of ``{"image"|"x": tensor, "label": int}`` into ``(x [B, ...], y int64 [B])``.

    ``x`` is float32 for features and images; integer inputs (token ids) stay integers, as int64.
    """
    key = "image" if "image" in rows[0] else "x"
    x = torch.stack([torch.as_tensor(row[key]) for row in rows])
    x = x.float() if x.is_floating_point() else x.long()
    y = torch.as_tensor([int(row["label"]) for row in rows], dtype=torch.int64)
    return x, y


def lm_collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn rows of ``{"input_ids": [T+1]}`` into next-token pairs ``(inputs [B, T], targets [B, T])``."""
    ids = torch.stack([torch.as_tensor(row["input_ids"]) for row in rows]).long()
    return ids[:, :-1], ids[:, 1:]


def chunk_bytes(data: bytes, seq_len: int, stride: int | None = None) -> np.ndarray:
    """Cut a byte string into windows of ``seq_len + 1`` bytes, so each window gives ``seq_len`` targets.

    ``stride`` defaults to ``seq_len + 1`` (windows do not overlap); a trailing partial window is dropped.
    Returns an int64 array of shape ``[N, seq_len + 1]``.
    """
    window = seq_len + 1
    stride = window if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be positive, got seq_len={seq_len}, stride={stride}")
    arr = np.frombuffer(data, dtype=np.uint8)
    if len(arr) < window:
        return np.zeros((0, window), dtype=np.int64)
    starts = np.arange(0, len(arr) - window + 1, stride)
    return arr[starts[:, None] + np.arange(window)[None, :]].astype(np.int64)


def lm_dataset(data: bytes, seq_len: int, stride: int | None = None) -> datasets.Dataset:
    """Chunk a byte string into a torch-formatted ``datasets.Dataset`` with an ``input_ids`` column."""
    chunks = chunk_bytes(data, seq_len, stride)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
    ds = datasets.Dataset.from_dict({"input_ids": chunks}, features=features)
    ds.set_format("torch")
    return ds


class SplitsDataModule(L.LightningDataModule):
    """A datamodule over ``splits`` (``train``, ``validation``, ``test``) that ``setup()`` builds once.

    A subclass builds ``splits`` in ``setup`` (from ``seed`` and the split fractions where it carves them);
    it says how a batch is collated (``collate_fn``) and, if not the whole split, which ``dataset`` a split
    loads.
    """

    def __init__(
        self, batch_size: int, seed: int, num_workers: int, val_fraction: float, test_fraction: float
    ) -> None:
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.splits: Any = None

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        raise NotImplementedError

    def dataset(self, split: str) -> Any:
        return self.splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.splits is not None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a seeded generator, so two runs with the same seed see the same batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """Train split in a fixed order, for observer/range calibration before QAT (or as PTQ)."""
        return self._loader("train", shuffle=False)
