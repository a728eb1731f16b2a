"""The MLP of the paper table: EMNIST-sized, 784 -> 512 -> 256 -> 62, loaded by path as a member class."""

from __future__ import annotations

import torch
from torch import nn


class EmnistMLP(nn.Module):
    """Two ReLU hidden layers over a flattened 28x28 image; 62 EMNIST classes (digits and letters)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 62))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
