"""Build member architectures, verify their files' digests, and load their state_dicts safely."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision.models
from torch import nn

from handlers.errors import IntegrityError, MemberLoadError
from handlers.manifest import MemberSpec


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_digests(base_dir: Path, digests: Mapping[str, str], owners: Mapping[str, str] | None = None) -> None:
    """Refuse to go on if any listed file is missing or its sha256 differs from the pinned one.

    `owners` maps a file to the member it belongs to, so the error names the member too.
    """
    for rel, expected in digests.items():
        owner = (owners or {}).get(rel)
        where = f"member {owner!r}: {rel}" if owner else rel
        path = base_dir / rel
        if not path.is_file():
            raise IntegrityError(f"{where}: file listed in the manifest is missing")
        actual = sha256_of(path)
        if actual != expected:
            raise IntegrityError(f"{where}: sha256 mismatch: manifest pins {expected}, file has {actual}")


def build_member(member: MemberSpec, base_dir: Path) -> nn.Module:
    """Instantiate the member's architecture with random weights (never downloads any)."""
    try:
        if member.arch_file is None:
            builder = member.arch.split(":", 1)[1]
            return torchvision.models.get_model(builder, weights=None, **member.kwargs)
        cls = getattr(_import_file(base_dir / member.arch_file), member.arch.rsplit(":", 1)[1])
        return cls(**member.kwargs)
    except Exception as e:  # Any failure to construct is reported against the member that caused it.
        raise MemberLoadError(f"member {member.name!r}: cannot build {member.arch} with {dict(member.kwargs)}: {e}") from e


def load_member(member: MemberSpec, base_dir: Path) -> nn.Module:
    """Build the member and load its state_dict with weights_only=True and strict=True, in eval mode."""
    module = build_member(member, base_dir)
    path = base_dir / member.weights
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects; say which member carried them.
        raise MemberLoadError(f"member {member.name!r}: cannot load {member.weights} as a state_dict: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MemberLoadError(
            f"member {member.name!r}: {member.weights} is not a state_dict of tensors (whole pickled models are refused)"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MemberLoadError(f"member {member.name!r}: state_dict does not fit {member.arch}: {e}") from e
    return module.eval()


def _import_file(path: Path) -> object:
    """Import a model file under a name unique to its path, so two files named alike never collide."""
    name = f"ensemble_member_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
