"""Small reference classifiers for the digits data.

Layers are plain named attributes (no ``nn.Sequential``) so quantization configs can address them by
name globs such as ``"conv1"`` (first layer) or ``"fc"`` / ``"head"`` (last layer).
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Three conv+BN+ReLU blocks and a linear classifier; sized for 8x8 inputs, ~15k params by default."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, channels: tuple[int, int] = (16, 32)
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c2, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(c2)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


class MLP(nn.Module):
    """Flatten, then ``fc1, relu1, fc2, relu2, ...`` and a final ``head`` linear layer."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (64,)) -> None:
        super().__init__()
        self.n_hidden = len(hidden)
        width = in_features
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, h))
            setattr(self, f"relu{i}", nn.ReLU())
            width = h
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ...]`` (flattened to ``in_features``) -> logits ``[B, num_classes]``."""
        x = torch.flatten(x, 1)
        for i in range(1, self.n_hidden + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)
