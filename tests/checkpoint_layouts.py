"""Checkpoint files as real projects publish them, written from known modules so loads can be checked exactly."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision
import yaml
from safetensors.torch import save_file
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

CHEXNET_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
CHEXNET_RULES = {
    "key": "state_dict",
    "strip_prefix": ["module.", "densenet121."],
    "rename": [[r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2."], [r"^classifier\.0\.", "classifier."]],
}


class CheXNet(nn.Module):
    """The CheXNet module as its authors wrote it: a wrapped DenseNet121 whose head is Sequential(Linear, Sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.densenet121 = torchvision.models.densenet121(weights=None)
        self.densenet121.classifier = nn.Sequential(nn.Linear(1024, len(CHEXNET_LABELS)), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.densenet121(x)


def randomize(module: ModuleT, seed: int) -> ModuleT:
    """Give every normalisation layer its own scale, shift and running statistics.

    Freshly built layers all hold 1 / 0 / 0 / 1, so loading one into another's place would go
    unnoticed; after this, a tensor in the wrong place changes the outputs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith(("running_mean", ".bias")):
                tensor.normal_(0.0, 0.1, generator=generator)
            elif name.endswith("running_var") or tensor.dim() == 1:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module.eval()


def old_densenet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DenseNet keys as torchvision wrote them before 0.4: `norm.1` for `norm1`, `conv.2` for `conv2`."""
    return {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value for key, value in state.items()
    }


def chexnet(seed: int = 3) -> CheXNet:
    """A randomly initialised CheXNet, the same for the same seed."""
    torch.manual_seed(seed)
    return randomize(CheXNet(), seed)


def as_pytorch_03(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A state_dict as PyTorch 0.3 returned it: no BatchNorm `num_batches_tracked` (added in 0.4.1) and no
    `_metadata` with module versions (added in 0.4), so torch's loading treats every module as unversioned."""
    return OrderedDict((key, value) for key, value in state.items() if not key.endswith(".num_batches_tracked"))


def save_as_pytorch_03(content: Any, path: Path) -> None:
    """torch.save's format of PyTorch 0.3 (the legacy pickle format, not a zip)."""
    torch.save(content, path, _use_new_zipfile_serialization=False)


def write_chexnet(path: Path, seed: int = 3) -> CheXNet:
    """Write a CheXNet checkpoint as its authors published it, with PyTorch 0.3; return the module it holds.

    A dict with the training state around the weights, which sit under `state_dict`, every key with
    DataParallel's `module.` and the wrapper's `densenet121.`, dense layers named the pre-0.4 way, no
    `num_batches_tracked` buffers, in the legacy (non-zip) format.
    """
    module = chexnet(seed)
    state = as_pytorch_03(old_densenet_names(nn.DataParallel(module).state_dict()))
    save_as_pytorch_03({"epoch": 7, "arch": "densenet121", "best_loss": 0.1532, "state_dict": state}, path)
    return module


def write_chexnet_ensemble(folder: Path, name: str = "chexnet") -> Path:
    """An ensembles.yaml serving the CheXNet checkpoint through `state_dict:` rules; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_chexnet(folder / "chexnet.pth.tar")
    ensemble: dict[str, Any] = {
        "version": "1.0",
        "task": "multilabel",
        "labels": CHEXNET_LABELS,
        "input": {"size": [64, 64]},
        "members": [
            {
                "name": "chexnet",
                "arch": "torchvision:densenet121",
                "kwargs": {"num_classes": len(CHEXNET_LABELS)},
                "weights": "chexnet.pth.tar",
                "state_dict": CHEXNET_RULES,
            }
        ],
    }
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {name: ensemble}}, sort_keys=False))
    return path


def half_safetensors(module: nn.Module, path: Path) -> dict[str, Any]:
    """A .safetensors file of float16 weights."""
    save_file({k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}, path)
    return {}


def legacy_pickle_format(module: nn.Module, path: Path) -> dict[str, Any]:
    """torch.save's format before PyTorch 1.6 (not a zip); weights_only=True still reads it."""
    torch.save(module.state_dict(), path, _use_new_zipfile_serialization=False)
    return {}


def ema_with_loss_buffer(module: nn.Module, path: Path) -> dict[str, Any]:
    """Nested weights (`ema.model`) next to a loss module's buffer the architecture has no place for."""
    weights = {**module.state_dict(), "criterion.pos_weight": torch.ones(3)}
    torch.save({"step": 5, "ema": {"decay": 0.999, "model": weights}}, path)
    return {"key": "ema.model", "drop": [r"^criterion\."]}
