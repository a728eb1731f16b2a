"""Checkpoint layouts: read a weights file safely, pick the weights inside it, and rename their keys.

One function per step, each driven by a member's `state_dict:` rules (data, validated with the rest
of ensembles.yaml), so the build, the in-process reference and the inspector all run the same code:

    read_checkpoint -> select_weights -> remap_keys -> fit_weights

Torch files load only with `torch.load(..., weights_only=True)` and `.safetensors` files through the
safetensors package; there is never a fallback to unsafe loading. A file that cannot be read that way
gets a message saying why and how to convert it.
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from handlers.manifest import StateDictRules

SAFETENSORS_HEADER_LIMIT = 100_000_000
EXAMPLES = 5
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
CONVERT = (
    "Convert it once, on a machine where you trust the file: `obj = torch.load(path, weights_only=False)`, "
    "then save only its tensors: `torch.save(obj.state_dict(), 'weights.pt')` for a whole model, "
    "`torch.save(obj['state_dict'], 'weights.pt')` for a checkpoint dict, or safetensors.torch.save_file(...)."
)

State = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A weights file cannot be read, or its weights cannot be picked or renamed; the caller names the member."""


def read_checkpoint(path: Path) -> Any:
    """The file's content: a state_dict, or a checkpoint dict holding one, loaded without running pickled code."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e}") from e
    if _is_safetensors(path, head):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"not a valid .safetensors file: {e}") from e
    if not zipfile.is_zipfile(path):  # Not today's torch.save format: the legacy pickle one, or no checkpoint.
        if tarfile.is_tarfile(path):
            raise CheckpointError(
                f"saved in PyTorch's legacy tar format, which torch.load(weights_only=True) cannot read. {CONVERT}"
            )
        if not head.startswith(b"\x80"):
            raise CheckpointError("neither a PyTorch checkpoint (torch.save) nor a .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on corrupt files; all mean "not a readable checkpoint".
        if type(e).__name__ != "UnpicklingError":
            raise CheckpointError(f"not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
        found = _UNSAFE_GLOBAL.search(str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"holds pickled Python objects{what} that torch.load(weights_only=True) refuses, as in a whole model saved "
            f"with torch.save(model) or a checkpoint with custom classes; it is never loaded unsafely. {CONVERT}"
        ) from e


def select_weights(content: Any, key: str | None) -> State:
    """The mapping of tensors at dotted path `key` (the whole file when None); every value must be a tensor."""
    where = "the file"
    selected = content
    if key is not None:
        walked: list[str] = []
        for part in key.split("."):
            if not isinstance(selected, Mapping) or part not in selected:
                entries = sorted(map(str, selected)) if isinstance(selected, Mapping) else []
                at = f" under {'.'.join(walked)!r}" if walked else ""
                raise CheckpointError(f"state_dict.key {key!r}: no entry {part!r}{at}; entries there: {entries[:20]}")
            selected = selected[part]
            walked.append(part)
        where = f"entry {key!r}"
    if not isinstance(selected, Mapping):
        raise CheckpointError(f"{where} is a {type(selected).__name__}, not a mapping of names to tensors")
    others = [f"{name} ({type(value).__name__})" for name, value in selected.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise CheckpointError(f"{where} is not a state_dict: besides tensors it holds {', '.join(sorted(others)[:8])}")
    if not selected:
        raise CheckpointError(f"{where} holds no tensors")
    return {str(name): value for name, value in selected.items()}


def remap_keys(state: State, rules: StateDictRules) -> dict[str, tuple[str, torch.Tensor]]:
    """New key -> (the file's key, tensor), after `drop`, `strip_prefix` and `rename`, in that order.

    Two of the file's keys that end up with one name are an error naming both.
    """
    drops = [re.compile(pattern) for pattern in rules.drop]
    renames = [(re.compile(pattern), replacement) for pattern, replacement in rules.rename]
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for source, tensor in state.items():
        if any(pattern.search(source) for pattern in drops):
            continue
        name = source
        for prefix in rules.strip_prefix:
            name = name.removeprefix(prefix)
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if name in out:
            raise CheckpointError(f"keys {out[name][0]!r} and {source!r} both become {name!r}; drop one or rename differently")
        out[name] = (source, tensor)
    return out


@dataclass(frozen=True)
class Mismatch:
    """How renamed weights differ from an architecture's own state_dict: key names and shapes."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    def summary(self) -> str:
        """Counts, then at most EXAMPLES examples of each kind: enough to see the pattern, never a wall of keys."""
        lines = [f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.reshaped)} of another shape"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {label} ({_of(keys)}): {', '.join(keys[:EXAMPLES])}")
        if self.reshaped:
            shown = "; ".join(f"{k}: file {list(a)}, model {list(b)}" for k, a, b in self.reshaped[:EXAMPLES])
            lines.append(f"  another shape ({_of(self.reshaped)}): {shown}")
        return "\n".join(lines)


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping whose every value is a tensor: weights as they can be loaded."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def compare(remapped: Mapping[str, tuple[str, torch.Tensor]], target: Mapping[str, torch.Tensor]) -> Mismatch:
    """Compare renamed weights, as `remap_keys` returns them, with the module's state_dict."""
    shapes = {k: tuple(tensor.shape) for k, (_, tensor) in remapped.items()}
    return Mismatch(
        missing=tuple(k for k in target if k not in shapes),
        unexpected=tuple(k for k in shapes if k not in target),
        reshaped=tuple(
            (k, shapes[k], tuple(t.shape)) for k, t in target.items() if k in shapes and shapes[k] != tuple(t.shape)
        ),
    )


def fit_weights(remapped: Mapping[str, tuple[str, torch.Tensor]], target: Mapping[str, torch.Tensor]) -> State:
    """One flat state_dict in the module's key order and dtypes, or CheckpointError with the mismatch.

    Half-precision (or double) weights are cast to the dtype of the module's own tensor.
    """
    mismatch = compare(remapped, target)
    if not mismatch.fits:
        raise WeightsDoNotFit(mismatch)
    fitted = {}
    for name, own in target.items():
        tensor = remapped[name][1]
        if tensor.dtype != own.dtype and tensor.is_floating_point() == own.is_floating_point():
            tensor = tensor.to(own.dtype)
        fitted[name] = tensor
    return fitted


class WeightsDoNotFit(CheckpointError):
    """Strict loading would fail: the message is the mismatch summary."""

    def __init__(self, mismatch: Mismatch) -> None:
        super().__init__(mismatch.summary())
        self.mismatch = mismatch


def save_normalized(state: State, path: Path) -> None:
    """Write a fitted state_dict as .safetensors: no pickle at serving time, and the same bytes for the same weights."""
    save_file({name: tensor.detach().contiguous().clone() for name, tensor in state.items()}, path)


def _is_safetensors(path: Path, head: bytes) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= SAFETENSORS_HEADER_LIMIT or length + 8 > path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(8)
        try:
            return isinstance(json.loads(f.read(length)), dict)
        except ValueError:
            return False


def _of(items: tuple[Any, ...]) -> str:
    return f"{min(EXAMPLES, len(items))} of {len(items)}" if len(items) > EXAMPLES else str(len(items))
