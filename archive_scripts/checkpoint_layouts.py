"""Save a module the way real projects publish checkpoints, and say which `state_dict:` rules read it back.

The multilabel demo writes each member in a different one of these layouts, so building the demo
exercises the same rules a user's own checkpoints need; the tests use them too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

Writer = Callable[[nn.Module, Path], dict[str, Any]]


class _LightningModule(nn.Module):
    """The shape of a LightningModule holding the network as `self.model`: its keys read `model.<key>`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def data_parallel(module: nn.Module, path: Path) -> dict[str, Any]:
    """Saved from `nn.DataParallel` (or DDP): every key starts with `module.`."""
    torch.save(nn.DataParallel(module).state_dict(), path)
    return {"strip_prefix": ["module."]}


def compiled(module: nn.Module, path: Path) -> dict[str, Any]:
    """Saved from a `torch.compile`d module: every key starts with `_orig_mod.`."""
    # torch.compile wraps a module in an OptimizedModule, itself a module; its stub types every result as a function.
    torch.save(cast(nn.Module, torch.compile(module)).state_dict(), path)
    return {"strip_prefix": ["_orig_mod."]}


def lightning(module: nn.Module, path: Path, *, hyper_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Lightning-style checkpoint: training state and hyper-parameters around `state_dict: {model.<key>: ...}`."""
    torch.save(
        {
            "epoch": 9,
            "global_step": 1260,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": _LightningModule(module).state_dict(),
            "hyper_parameters": hyper_parameters or {"lr": 0.003},
        },
        path,
    )
    return {"key": "state_dict", "strip_prefix": ["model."]}


def safetensors_file(module: nn.Module, path: Path) -> dict[str, Any]:
    """A flat `.safetensors` file, as Hugging Face tools write them."""
    save_file({key: tensor.contiguous() for key, tensor in module.state_dict().items()}, path)
    return {}


def hugging_face(module: nn.Module, path: Path) -> dict[str, Any]:
    """`save_pretrained` into the weights' folder: config.json and model.safetensors, as transformers publishes
    a model (its original key layout, which a `transformers:` member reads back without rules)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cast("transformers.PreTrainedModel", module).save_pretrained(path.parent)
    return {}


LAYOUTS: dict[str, Writer] = {
    "data_parallel": data_parallel,
    "compiled": compiled,
    "lightning": lightning,
    "safetensors": safetensors_file,
    "hugging_face": hugging_face,
}
