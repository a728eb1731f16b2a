"""Small members for the reliability suite, loaded by path like any `<file.py>:<Class>` member."""

from __future__ import annotations

import time

import torch
from torch import nn

HANG_S = 30.0
WHITE = 1.99  # A white pixel, (1.0 - 0.5) / 0.25 with the suite's normalisation, less rounding.


class SmallNet(nn.Module):
    """One convolution, global average pooling, one linear layer: fast, and distinct scores per image."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class HangingNet(SmallNet):
    """SmallNet that hangs for HANG_S seconds on an all-white image: a member stuck past the response timeout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] and bool((x.flatten(1).amin(dim=1) >= WHITE).any()):
            time.sleep(HANG_S)
        return super().forward(x)
