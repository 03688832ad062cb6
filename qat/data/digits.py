"""scikit-learn's bundled 8x8 digits as a LightningDataModule.

The data ships inside scikit-learn, so this needs no download and builds in well under a second:
a good default for quick QAT experiments and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
from sklearn.datasets import load_digits

from qat.data.common import SplitsDataModule, classification_collate


def build_digits_splits(
    val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> datasets.DatasetDict:
    """Return a stratified, seeded ``train``/``validation``/``test`` split of the digits data.

    ``image`` is float32 ``[1, 8, 8]`` scaled to [0, 1]; ``label`` is an int class id.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    raw = load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[:, None, :, :]
    features = datasets.Features(
        {
            "image": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
            "label": datasets.ClassLabel(num_classes=10),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": raw.target.astype(np.int64)}, features=features
    )

    # Two stratified cuts: first hold out test, then carve validation from what remains.
    first = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    val_of_rest = val_fraction / (1.0 - test_fraction)
    second = first["train"].train_test_split(test_size=val_of_rest, seed=seed, stratify_by_column="label")
    splits = datasets.DatasetDict(
        {"train": second["train"], "validation": second["test"], "test": first["test"]}
    )
    splits.set_format("torch")
    return splits


class DigitsDataModule(SplitsDataModule):
    """8x8 handwritten digits (1797 images, 10 classes) as ``(x [B,1,8,8] float32, y [B] int64)`` batches.

    Splits are stratified and seeded, so the same seed always gives the same train/val/test images.
    """

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, val_fraction, test_fraction)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; later calls are no-ops."""
        if self.splits is None:
            self.splits = build_digits_splits(self.val_fraction, self.test_fraction, self.seed)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        return classification_collate
