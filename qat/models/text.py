"""A small text classifier over token ids: embedding, mean over the real tokens, then an MLP.

Layers are plain named attributes (``embed``, ``fc1``, ``head``) like the other reference models, so every
one is a quantizable leaf that name globs can address.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``attention_mask`` is 1 (padding ignored); [B, T, D] -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextClassifier(nn.Module):
    """Token ids ``[B, T]`` -> ``embed`` -> mean over tokens that are not ``pad_token_id`` -> ``fc1``,
    ``relu1`` -> ``head`` -> logits ``[B, num_classes]`` (a bag-of-embeddings classifier)."""

    def __init__(
        self, vocab_size: int, num_classes: int, pad_token_id: int = 0, d_model: int = 64, hidden: int = 64
    ) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id
        self.embed = nn.Embedding(vocab_size, d_model)
        self.fc1 = nn.Linear(d_model, hidden)
        self.relu1 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = mean_pool(self.embed(input_ids), input_ids != self.pad_token_id)
        return self.head(self.relu1(self.fc1(x)))
