"""Explain why a checkpoint does not fit an architecture, and propose the `state_dict:` block that makes it fit.

The proposal is searched, not guessed: every candidate block is applied with the same `remap_keys`
the build uses and scored by how many of the architecture's tensors it fills with the right shape.
Candidates come from the file's structure:
- weights nested in a checkpoint dict -> `key:` (every mapping of tensors in the file is tried);
- a dotted prefix shared by every key (`module.`, `_orig_mod.`, `model.`) -> `strip_prefix:`;
- a prefix every key of the architecture has and the file lacks -> `rename: [['^', 'prefix.']]`;
- known historical namings (DenseNet's `norm.1` before torchvision 0.4) -> `rename:`;
- a layer wrapped in a Sequential by its author (`classifier.0.weight` for `classifier.weight`) -> `rename:`;
- leftovers the architecture has no place for (a loss's buffers) -> `drop:`, only once nothing is missing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from handlers.config.specs import StateDictRules
from handlers.weights.checkpoints import (
    CheckpointError,
    Mismatch,
    State,
    Target,
    compare,
    is_state_dict,
    remap_keys,
    saved_versions,
    select_weights,
)

MAX_DEPTH = 4
SHAPE_HINT = (
    "\nTensors of another shape mean another architecture: check the member's kwargs (num_classes, width, ...)."
)
# Namings older torchvision releases saved. torch's load_state_dict renames ViT's pre-0.14 MLP keys by itself
# (MLPBlock._load_from_state_dict); we differ on purpose: the fit renames nothing silently, so these are
# proposed as explicit `rename:` rules, each labelled in the proposal with the release that saved it.
KNOWN_RENAMES: tuple[tuple[str, str, str], ...] = (
    ("torchvision DenseNet before 0.4 (norm.1 -> norm1)", r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2."),
    ("torchvision ViT before 0.14 (mlp.linear_1 -> mlp.0)", r"(\.mlp)\.linear_1\.", r"\1.0."),
    ("torchvision ViT before 0.14 (mlp.linear_2 -> mlp.3)", r"(\.mlp)\.linear_2\.", r"\1.3."),
)


@dataclass(frozen=True)
class Proposal:
    """The best block found and what is still wrong with it (nothing, when it fits)."""

    rules: StateDictRules
    mismatch: Mismatch

    def block(self, indent: str = "") -> str:
        """The block as YAML, ready to paste under a member in ensembles.yaml; every string single-quoted."""
        rules = self.rules
        lines = ["state_dict:"]
        if rules.key is not None:
            lines.append(f"  key: {_quoted(rules.key)}")
        for name in ("drop", "strip_prefix"):
            if getattr(rules, name):
                lines.append(f"  {name}: [{', '.join(map(_quoted, getattr(rules, name)))}]")
        if rules.rename:
            lines.append("  rename:")
            known = {(pattern, replacement): label for label, pattern, replacement in KNOWN_RENAMES}
            for pattern, replacement in rules.rename:
                label = known.get((pattern, replacement))
                lines.append(f"    - [{_quoted(pattern)}, {_quoted(replacement)}]" + (f"  # {label}" if label else ""))
        return "\n".join(indent + line for line in lines)


def weight_paths(content: Any) -> list[tuple[str | None, int]]:
    """Every mapping of tensors in the file, as (dotted key or None for the file itself, tensor count)."""
    found: list[tuple[str | None, int]] = []

    def walk(value: Any, path: list[str]) -> None:
        if is_state_dict(value):
            found.append((".".join(path) or None, len(value)))
            return
        if not isinstance(value, Mapping) or len(path) > MAX_DEPTH:
            return
        for name, item in value.items():
            if isinstance(name, str) and "." not in name:
                walk(item, [*path, name])

    walk(content, [])
    return found


def propose(content: Any, target: Target) -> Proposal | None:
    """The block that fills the most of `target` (the module's state_dict), or None when the file has no weights."""
    best: tuple[tuple[int, int], Proposal] | None = None
    for key, _ in weight_paths(content):
        state = select_weights(content, key)
        proposal = _best_for(state, StateDictRules(key=key), target, saved_versions(content, key))
        score = _score(proposal.mismatch, target)
        if best is None or score > best[0]:
            best = (score, proposal)
    return None if best is None else best[1]


def explain(content: Any, target: Target, given: StateDictRules) -> str:
    """What to change, appended to a load error: a block that fits, or the closest one and what it leaves."""
    try:
        proposal = propose(content, target)
    except CheckpointError:  # Every candidate collided: there is nothing better to propose than the error itself.
        return ""
    if proposal is None:
        return ""
    hint = SHAPE_HINT if proposal.mismatch.reshaped else ""
    if proposal.mismatch.fits and proposal.rules != given:
        return (
            "\nThis state_dict: block loads every tensor strictly; put it under the member in ensembles.yaml:\n"
            + proposal.block("  ")
        )
    if proposal.rules == given or _score(proposal.mismatch, target) <= _score(
        _given_mismatch(content, target, given), target
    ):
        return hint
    return (
        "\nThe closest state_dict: block found still leaves "
        + proposal.mismatch.summary()
        + "\n"
        + proposal.block("  ")
        + hint
    )


def layout(content: Any) -> list[str]:
    """The file's structure for the inspector: top-level entries, tensor counts, bytes, dtypes, shared prefixes."""
    lines = []
    if isinstance(content, Mapping) and not is_state_dict(content):
        lines.append(f"a checkpoint dict with {len(content)} top-level entries:")
        for name, value in content.items():
            lines.append(f"  {name}: {_entry(value)}")
    for key, count in weight_paths(content):
        tensors = list(select_weights(content, key).items())
        size = sum(t.numel() * t.element_size() for _, t in tensors)
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for _, t in tensors)
        lines.append(
            f"weights at {'the top level' if key is None else f'key {key!r}'}: {count} tensors, {size / 1e6:.1f} MB"
        )
        lines.append(f"  dtypes: {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}")
        prefix = _shared_prefix([name for name, _ in tensors])
        lines.append(f"  prefix shared by every key: {prefix!r}" if prefix else "  no prefix shared by every key")
        lines.append(f"  first keys: {', '.join(name for name, _ in tensors[:5])}")
    if not lines:
        lines.append(f"no mapping of tensors found in this file (it holds a {type(content).__name__})")
    return lines


def _best_for(state: State, base: StateDictRules, target: Target, versions: Mapping[str, int]) -> Proposal:
    """Try each prefix to strip or add and each known rename; then collapse Sequential indices and drop leftovers."""

    def mismatch_of(rules: StateDictRules) -> Mismatch:
        return _mismatch(state, rules, target, versions)

    candidates = [replace(base, strip_prefix=strip) for strip in _strip_options(state)]
    candidates += [replace(base, rename=((r"^", prefix),)) for prefix in _add_options(state, target)]
    scored = [(_score(mismatch_of(rules), target), rules) for rules in candidates]
    rules = max(scored, key=lambda item: item[0])[1]
    for _, pattern, replacement in KNOWN_RENAMES:
        attempt = replace(rules, rename=(*rules.rename, (pattern, replacement)))
        if _score(mismatch_of(attempt), target) > _score(mismatch_of(rules), target):
            rules = attempt
    rules = replace(rules, rename=(*rules.rename, *_sequential_collapses(state, rules, target)))
    mismatch = mismatch_of(rules)
    if mismatch.unexpected and not mismatch.missing and not mismatch.reshaped:
        rules = replace(rules, drop=_drops(state, rules, set(mismatch.unexpected)))
        mismatch = mismatch_of(rules)
    return Proposal(rules, mismatch)


def _strip_options(state: State) -> list[tuple[str, ...]]:
    parts = _shared_prefix(list(state)).split(".")[:-1]
    return [tuple(f"{part}." for part in parts[:n]) for n in range(len(parts) + 1)]


def _add_options(state: State, target: Target) -> list[str]:
    """Prefixes of the architecture's keys (e.g. `model.`) that the file's keys lack."""
    parts = _shared_prefix(list(target.state)).split(".")[:-1]
    options = ["".join(f"{part}." for part in parts[:n]) for n in range(1, len(parts) + 1)]
    return [prefix for prefix in options if not all(name.startswith(prefix) for name in state)]


def _sequential_collapses(state: State, rules: StateDictRules, target: Target) -> list[tuple[str, str]]:
    """`head.0.weight` -> `head.weight` where the architecture has the latter and the file does not."""
    renamed = remap_keys(state, rules)
    found: dict[str, tuple[str, str]] = {}
    for name in renamed:
        if name in target.state:
            continue
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            shorter = ".".join(parts[:i] + parts[i + 1 :])
            if part.isdigit() and shorter in target.state and shorter not in renamed:
                stem = ".".join(parts[:i])
                found.setdefault(f"{stem}.{part}", ("^" + re.escape(f"{stem}.{part}."), f"{stem}." if stem else ""))
                break
    return list(found.values())


def _drops(state: State, rules: StateDictRules, unexpected: set[str]) -> tuple[str, ...]:
    """Drop regexes for the file's keys whose new names the architecture lacks: by top entry when all of it goes."""
    sources = {source for name, (source, _) in remap_keys(state, rules).items() if name in unexpected}
    by_root: dict[str, list[str]] = {}
    for source in state:
        by_root.setdefault(source.split(".")[0], []).append(source)
    drops = []
    for root, members in by_root.items():
        gone = [source for source in members if source in sources]
        if gone and len(gone) == len(members) and len(members) > 1:
            drops.append("^" + re.escape(f"{root}."))
        else:
            drops.extend(f"^{re.escape(source)}$" for source in gone)
    return tuple(drops)


def _mismatch(state: State, rules: StateDictRules, target: Target, versions: Mapping[str, int]) -> Mismatch:
    try:
        return compare(remap_keys(state, rules), target, versions)
    except CheckpointError:  # Two keys collide under these rules: as bad as matching nothing.
        return Mismatch(missing=tuple(target.state), unexpected=tuple(state), reshaped=())


def _given_mismatch(content: Any, target: Target, given: StateDictRules) -> Mismatch:
    try:
        return _mismatch(select_weights(content, given.key), given, target, saved_versions(content, given.key))
    except CheckpointError:
        return Mismatch(missing=tuple(target.state), unexpected=(), reshaped=())


def _score(mismatch: Mismatch, target: Target) -> tuple[int, int]:
    """More of the architecture filled with the right shape first (torch's own fills count), then fewer leftovers."""
    filled = len(target.state) - len(mismatch.missing) - len(mismatch.reshaped)
    return filled, -len(mismatch.unexpected)


def _shared_prefix(names: list[str]) -> str:
    """The longest run of whole dotted components every name starts with, ending in a dot ('' if none)."""
    if not names:
        return ""
    split = [name.split(".")[:-1] for name in names]
    shared: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    return "".join(f"{part}." for part in shared)


def _quoted(text: str) -> str:
    """A YAML single-quoted scalar: backslashes stay literal, quotes double."""
    return "'" + text.replace("'", "''") + "'"


def _entry(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"mapping of {len(value)} entries ({tensors} tensors)"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
