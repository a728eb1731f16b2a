"""Model classes of our own for the demo ensemble, referenced from ensembles.yaml as `<file>:<Class>`."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A small VGG-style CNN: three conv blocks, global max pooling (a target anywhere counts), one linear layer."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width: int = 24) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


class StridedDilatedNet(nn.Module):
    """An all-convolutional net: strided convolutions instead of pooling, then dilated ones for context."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width: int = 24) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *conv(in_channels, width, stride=2),
            *conv(width, 2 * width, stride=2),
            *conv(2 * width, 4 * width, dilation=2),
            *conv(4 * width, 4 * width, dilation=3),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))
