"""A tiny model class for test ensembles, loaded by path like any `<file.py>:<Class>` member."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


class PoolNet(nn.Module):
    """One convolution, global max pooling, one linear layer: enough to give distinct outputs per image."""

    def __init__(self, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).amax(dim=(2, 3)))


class BranchyNet(PoolNet):
    """PoolNet with a data-dependent branch, which torch.vmap cannot run: it must not be fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if bool(out.sum() > -1e9) else -out


class TinyMLP(nn.Module):
    """Flatten, one hidden layer: a member of a tensor-input ensemble."""

    def __init__(self, *, in_features: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayoutSensitiveNet(PoolNet):
    """PoolNet whose answer flips sign for channels-last input: a plan that changes the layout must be caught."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if x.is_contiguous() else -out


class NormNet(PoolNet):
    """PoolNet with a normalisation layer after its convolution: BatchNorm2d, or torchvision's FrozenBatchNorm2d
    as detection backbones freeze theirs (which keeps no `num_batches_tracked`)."""

    def __init__(self, *, num_classes: int, frozen: bool = False) -> None:
        super().__init__(num_classes=num_classes)
        self.norm = FrozenBatchNorm2d(8) if frozen else nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).amax(dim=(2, 3)))
