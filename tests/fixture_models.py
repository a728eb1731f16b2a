"""A tiny model class for test ensembles, loaded by path like any `<file.py>:<Class>` member."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

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
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

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


@dataclass
class Scores:
    """A dataclass output, as some libraries return."""

    logits: torch.Tensor
    embedding: torch.Tensor


class StructuredNet(PoolNet):
    """PoolNet whose forward returns what published models return; `form` picks the structure:
    `tuple` (MTCNN's stage networks: boxes, then softmax probabilities), `dict`, `dataclass`, `nested`
    (a dict inside a tuple) or `map` (a fully convolutional net's [N, C, 1, 1]). `activation` (softmax or
    sigmoid) makes the model apply its own."""

    def __init__(self, *, num_classes: int, form: str, activation: str | None = None) -> None:
        super().__init__(num_classes=num_classes)
        self.form = form
        self.activation = activation

    def forward(self, x: torch.Tensor) -> Any:
        logits = super().forward(x)
        scores = {None: logits, "softmax": torch.softmax(logits, dim=1), "sigmoid": torch.sigmoid(logits)}[
            self.activation
        ]
        boxes = x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]
        if self.form == "tuple":
            return boxes, scores
        if self.form == "dict":
            return {"boxes": boxes, "logits": scores}
        if self.form == "dataclass":
            return Scores(logits=scores, embedding=boxes)
        if self.form == "nested":
            return {"logits": scores, "boxes": boxes}, boxes.sum(dim=1)
        if self.form == "map":
            return scores[:, :, None, None]
        raise ValueError(f"unknown form {self.form!r}")


class FixedNet(nn.Module):
    """Returns the same row for every input: known values for the checks on what a member returns."""

    def __init__(self, *, values: list[float]) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values.expand(x.shape[0], -1) + 0 * x.mean()


class SvdNet(PoolNet):
    """PoolNet plus a term ONNX has no operator for (singular values, times 0): no exporter can take it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).amax(dim=(2, 3))
        return self.head(features) + 0 * torch.linalg.svdvals(features).sum(dim=-1, keepdim=True)


class KnifeEdgeNet(nn.Module):
    """Two classes decided by a difference far below int8's resolution (its two channels' weights differ by ~1e-4),
    so that quantisation flips its labels: the lossy precision the build must refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).mean(dim=(2, 3))
        edge = 1000 * (features[:, 0] - features[:, 1])
        return torch.stack([edge, -edge], dim=1)


class FaultyMLP(TinyMLP):
    """TinyMLP that misbehaves on marked instances (first value equal to `mark`): `fault` is `sleep` (for `seconds`,
    then answers), `raise` (a RuntimeError) or `nan` (NaN scores for those instances). Runs eager only: a traced plan
    would bake the branch in."""

    def __init__(
        self, *, in_features: int, num_classes: int, fault: str, mark: float, seconds: float = 0.0, hidden: int = 16
    ) -> None:
        super().__init__(in_features=in_features, num_classes=num_classes, hidden=hidden)
        self.fault, self.mark, self.seconds = fault, mark, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        marked = x.flatten(1)[:, 0] == self.mark
        if not bool(marked.any()):
            return out
        if self.fault == "sleep":
            time.sleep(self.seconds)
            return out
        if self.fault == "raise":
            raise RuntimeError("injected fault on a marked instance")
        return torch.where(marked[:, None], torch.full_like(out, math.nan), out)
