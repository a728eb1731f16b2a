"""Checkpoint layouts: read a weights file safely, pick the weights inside it, and rename their keys.

One function per step, each driven by a member's `state_dict:` rules (data, validated with the rest
of ensembles.yaml), so the build, the in-process reference and the inspector all run the same code:

    read_checkpoint -> select_weights -> remap_keys -> fit_weights (against the module's `Target`)

The fit is exactly as strict as torch's own `load_state_dict(strict=True)`, no more: a BatchNorm
saved before PyTorch 0.4.1 has no `num_batches_tracked`, which torch fills with 0 for a state_dict
that carries no newer version for that module, and torchvision's FrozenBatchNorm2d discards one it
has no place for. `Target` lists those keys, and the fit records what it filled or discarded.

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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torchvision.ops import FrozenBatchNorm2d

from handlers.config.specs import StateDictRules

SAFETENSORS_HEADER_LIMIT = 100_000_000
EXAMPLES = 5
TRACKED = "num_batches_tracked"
# The version of _NormBase's state that added TRACKED (PyTorch 0.4.1); older or unversioned state lacks it.
TRACKED_SINCE_VERSION = 2
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
    selected, where = _select(content, key)
    if not isinstance(selected, Mapping):
        raise CheckpointError(f"{where} is a {type(selected).__name__}, not a mapping of names to tensors")
    others = [
        f"{name} ({type(value).__name__})" for name, value in selected.items() if not isinstance(value, torch.Tensor)
    ]
    if others:
        raise CheckpointError(f"{where} is not a state_dict: besides tensors it holds {', '.join(sorted(others)[:8])}")
    if not selected:
        raise CheckpointError(f"{where} holds no tensors")
    return {str(name): value for name, value in selected.items()}


def saved_versions(content: Any, key: str | None) -> dict[str, int]:
    """The module versions `Module.state_dict()` recorded next to the weights at `key` (its `_metadata`), by the
    file's own module prefix; empty for a file saved before PyTorch 0.4.1, a plain dict or a .safetensors file."""
    selected, _ = _select(content, key)
    metadata = getattr(selected, "_metadata", None)
    if not isinstance(metadata, Mapping):
        return {}
    return {
        str(prefix): entry["version"]
        for prefix, entry in metadata.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("version"), int)
    }


def _select(content: Any, key: str | None) -> tuple[Any, str]:
    """The value at dotted path `key`, and how to name it in a message."""
    if key is None:
        return content, "the file"
    selected = content
    walked: list[str] = []
    for part in key.split("."):
        if not isinstance(selected, Mapping) or part not in selected:
            entries = sorted(map(str, selected)) if isinstance(selected, Mapping) else []
            at = f" under {'.'.join(walked)!r}" if walked else ""
            raise CheckpointError(f"state_dict.key {key!r}: no entry {part!r}{at}; entries there: {entries[:20]}")
        selected = selected[part]
        walked.append(part)
    return selected, f"entry {key!r}"


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
            raise CheckpointError(
                f"keys {out[name][0]!r} and {source!r} both become {name!r}; drop one or rename differently"
            )
        out[name] = (source, tensor)
    return out


@dataclass(frozen=True)
class Target:
    """What strict loading into a module expects: its state_dict, and the keys torch itself forgives.

    `fillable`: each tracking BatchNorm's (any `_NormBase`'s) `num_batches_tracked`, which torch fills
    with 0 when the file lacks it and records no version >= 2 for that module. `discarded`: each
    FrozenBatchNorm2d's `num_batches_tracked`, which torchvision drops when the file has it.
    """

    state: Mapping[str, torch.Tensor]
    fillable: frozenset[str] = frozenset()
    discarded: frozenset[str] = frozenset()

    @classmethod
    def of(cls, module: nn.Module) -> Target:
        """The target of `module`, its forgiven keys found by the classes whose loading forgives them."""
        fillable, discarded = set(), set()
        for name, layer in module.named_modules():
            key = f"{name}.{TRACKED}" if name else TRACKED
            if isinstance(layer, _NormBase) and layer.track_running_stats:
                fillable.add(key)
            elif isinstance(layer, FrozenBatchNorm2d):
                discarded.add(key)
        return cls(module.state_dict(), frozenset(fillable), frozenset(discarded))


@dataclass(frozen=True)
class Mismatch:
    """How renamed weights differ from an architecture's own state_dict: key names and shapes.

    `filled` and `discarded` are keys torch's own loading fills or drops (see `Target`): they are no
    mismatch, and are left out of the counts so the examples show the keys that matter.
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    filled: tuple[str, ...] = ()
    discarded: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    def summary(self) -> str:
        """Counts, then at most EXAMPLES examples of each kind: enough to see the pattern, never a wall of keys."""
        lines = [
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.reshaped)} of another shape"
        ]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {label} ({_of(keys)}): {', '.join(keys[:EXAMPLES])}")
        if self.reshaped:
            shown = "; ".join(f"{k}: file {list(a)}, model {list(b)}" for k, a, b in self.reshaped[:EXAMPLES])
            lines.append(f"  another shape ({_of(self.reshaped)}): {shown}")
        forgiven = forgiven_note(self.filled, self.discarded)
        if forgiven:
            lines.append(f"  not counted: {forgiven}")
        return "\n".join(lines)


def forgiven_note(filled: tuple[str, ...], discarded: tuple[str, ...]) -> str:
    """What torch's loading rules filled or dropped, in words ('' when nothing)."""
    parts = []
    if filled:
        parts.append(
            f"{len(filled)} {TRACKED} buffers filled with 0 "
            "(saved before PyTorch 0.4.1, as torch's strict loading does)"
        )
    if discarded:
        parts.append(f"{len(discarded)} {TRACKED} buffers of FrozenBatchNorm2d layers dropped (as torchvision does)")
    return "; ".join(parts)


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping whose every value is a tensor: weights as they can be loaded."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def compare(
    remapped: Mapping[str, tuple[str, torch.Tensor]], target: Target, versions: Mapping[str, int] | None = None
) -> Mismatch:
    """Compare renamed weights, as `remap_keys` returns them, with the module's state_dict, forgiving what torch
    forgives. `versions` are the file's module versions (`saved_versions`), by its own key prefixes."""
    shapes = {k: tuple(tensor.shape) for k, (_, tensor) in remapped.items()}
    missing = [k for k in target.state if k not in shapes]
    filled = tuple(k for k in missing if k in target.fillable and _unversioned(k, remapped, versions or {}))
    return Mismatch(
        missing=tuple(k for k in missing if k not in filled),
        unexpected=tuple(k for k in shapes if k not in target.state and k not in target.discarded),
        reshaped=tuple(
            (k, shapes[k], tuple(t.shape))
            for k, t in target.state.items()
            if k in shapes and not _same_shape(shapes[k], tuple(t.shape))
        ),
        filled=filled,
        discarded=tuple(k for k in shapes if k in target.discarded),
    )


def _same_shape(saved: tuple[int, ...], own: tuple[int, ...]) -> bool:
    """Equal shapes, or a one-element vector for a scalar: PyTorch before 0.4 had no 0-dim tensors, and torch's
    loading still takes such a vector's element for a scalar parameter or buffer."""
    return saved == own or (own == () and saved == (1,))


def _unversioned(key: str, remapped: Mapping[str, tuple[str, torch.Tensor]], versions: Mapping[str, int]) -> bool:
    """Whether torch would fill `key`: the file records no version >= 2 for the module it belongs to.

    That module's prefix in the file is found through a sibling buffer's original key."""
    stem = key.removesuffix(TRACKED)
    sibling = remapped.get(f"{stem}running_mean")
    if sibling is None:
        return True
    prefix = sibling[0].removesuffix("running_mean").removesuffix(".")
    return versions.get(prefix, 0) < TRACKED_SINCE_VERSION


@dataclass(frozen=True)
class Fitted:
    """A flat state_dict that loads strictly into the module, and the keys torch's rules filled or dropped."""

    state: State
    filled: tuple[str, ...] = ()
    discarded: tuple[str, ...] = ()

    def record(self) -> dict[str, dict[str, int]]:
        """What the manifest's `sources` entry says of it: counts by buffer name, only what happened."""
        record = {}
        for kind, keys in (("filled", self.filled), ("discarded", self.discarded)):
            if keys:
                record[kind] = dict(sorted(Counter(key.rsplit(".", 1)[-1] for key in keys).items()))
        return record


def fit_weights(
    remapped: Mapping[str, tuple[str, torch.Tensor]], target: Target, versions: Mapping[str, int] | None = None
) -> Fitted:
    """One flat state_dict in the module's key order and dtypes, or CheckpointError with the mismatch.

    Half-precision (or double) weights are cast to the dtype of the module's own tensor; a filled
    `num_batches_tracked` is 0, as torch fills it.
    """
    mismatch = compare(remapped, target, versions)
    if not mismatch.fits:
        raise WeightsDoNotFit(mismatch)
    fitted = {}
    for name, own in target.state.items():
        if name in mismatch.filled:
            fitted[name] = torch.zeros_like(own)
            continue
        tensor = remapped[name][1]
        if own.dim() == 0 and tensor.dim() == 1:
            tensor = tensor[0]
        if tensor.dtype != own.dtype and tensor.is_floating_point() == own.is_floating_point():
            tensor = tensor.to(own.dtype)
        fitted[name] = tensor
    return Fitted(fitted, mismatch.filled, mismatch.discarded)


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
