"""Helpers shared by the datamodules: batch collation and byte-level chunking.

Collate functions live at module level so DataLoader workers can pickle them.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

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
