"""Architectures as `arch:` names them, checked before anything is built.

A zoo's model must exist in the zoo (torchvision, timm); a model file must define the class (parsed,
never run); a Hugging Face folder must hold a config.json; an installed package's module must import
and define the name. timm, transformers and package members also pin the distribution that provides
their code (`requires:`): the build records the version it used, and a worker whose environment has
another version, or none, refuses to load with the `pip install` line that fixes it.
"""

from __future__ import annotations

import ast
import importlib
import json
from collections.abc import Mapping
from difflib import get_close_matches
from functools import cache
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from handlers.config.fields import fail
from handlers.config.specs import Arch

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# The distribution that provides the code of each zoo; a package member's comes from its top-level module.
ZOO_DISTRIBUTIONS = {"timm": "timm", "transformers": "transformers"}


def check_arch(arch: str, base_dir: Path, check_files: bool = True) -> Arch:
    """The architecture taken apart, once what can be checked without running its code holds; `check_files=False`
    lets a Hugging Face folder be absent (training writes it)."""
    try:
        parsed = Arch.parse(arch)
    except ValueError as e:
        fail(str(e))
    if parsed.kind == "torchvision":
        import torchvision.models

        if parsed.name not in torchvision.models.list_models():
            fail(f"unknown torchvision model {parsed.name!r}")
    elif parsed.kind == "timm":
        import timm

        known = timm.list_models()
        if parsed.name not in known:
            close = get_close_matches(parsed.name, known, n=3)
            fail(f"unknown timm model {parsed.name!r}" + (f"; closest: {', '.join(close)}" if close else ""))
    elif parsed.kind == "transformers" and (check_files or (base_dir / parsed.target / HF_CONFIG).exists()):
        hf_config(base_dir / parsed.target)
    elif parsed.kind == "file":
        path = base_dir / parsed.target
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError, ValueError) as e:
            fail(f"cannot read model file {path}: {e}")
        if not any(isinstance(node, ast.ClassDef) and node.name == parsed.name for node in tree.body):
            fail(f"model file {parsed.target} defines no top-level class {parsed.name!r}")
    return parsed


def hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face model folder's config.json, which must name its model_type (as save_pretrained writes it)."""
    path = folder / HF_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(
            f"cannot read the Hugging Face config {path}: {e}; "
            "a transformers: member names a folder save_pretrained wrote"
        )
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        fail(f"{path} names no model_type; a transformers: member names a folder save_pretrained wrote")
    return config


def hf_labels(folder: Path, check_files: bool = True) -> tuple[str, ...] | None:
    """The labels a Hugging Face config's id2label gives, in output order; None when it gives none (or, without
    `check_files`, when the folder is not written yet)."""
    if not check_files and not (folder / HF_CONFIG).exists():
        return None
    id2label = hf_config(folder).get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        order = sorted((int(index), str(label)) for index, label in id2label.items())
    except ValueError:
        fail(f"{folder / HF_CONFIG}: id2label keys must be output indices, got {sorted(id2label)}")
    if [index for index, _ in order] != list(range(len(order))):
        fail(f"{folder / HF_CONFIG}: id2label must number the outputs 0 to {len(order) - 1}")
    return tuple(label for _, label in order)


def requirement(arch: Arch, requires: str | None) -> str | None:
    """The `<distribution>==<version>` a timm, transformers or package member needs, as installed here.

    A given `requires` (any pip specifier) must be met by this environment; absent, the distribution that
    provides the code is found and pinned at its installed version. torchvision and model files pin none.
    """
    if arch.kind in ("torchvision", "file"):
        if requires is not None:
            fail(
                "requires is for timm, transformers and package members; "
                f"{arch.kind} members run code this project pins"
            )
        return None
    if requires is None:
        distribution = ZOO_DISTRIBUTIONS.get(arch.kind) or _distribution_of(arch.target.split(".")[0])
        try:
            return f"{distribution}=={version(distribution)}"
        except PackageNotFoundError:
            fail(
                f"{arch.kind} members need {distribution}, which this environment does not have; "
                f"install it: pip install {distribution}"
            )
    try:
        wanted = Requirement(requires)
    except InvalidRequirement as e:
        fail(f"expected a pip requirement such as 'facenet-pytorch==2.6.0', got {requires!r}: {e}")
    try:
        installed = version(wanted.name)
    except PackageNotFoundError:
        fail(
            f"{arch.kind} member needs {requires}, and this environment does not have {wanted.name}; "
            f"install it where the ensemble runs: pip install '{requires}'"
        )
    if not wanted.specifier.contains(installed, prereleases=True):
        fail(
            f"{arch.kind} member needs {requires}, and this environment has {wanted.name} {installed}; "
            f"install it where the ensemble runs: pip install '{requires}'"
        )
    return f"{wanted.name}=={installed}"


def check_package_member(arch: Arch) -> None:
    """The module imports (running the package's code, as loading the member will) and defines the callable."""
    try:
        module = importlib.import_module(arch.target)
    except Exception as e:  # An installed package's import can fail in any way; the member is refused saying how.
        fail(f"cannot import {arch.target}: {type(e).__name__}: {e}")
    if not callable(getattr(module, arch.name, None)):
        fail(f"module {arch.target} defines no class or function {arch.name!r}")


def _distribution_of(top_level: str) -> str:
    """The installed distribution that provides the top-level module, e.g. facenet_pytorch -> facenet-pytorch."""
    found = _top_level_distributions().get(top_level, [])
    if len(found) != 1:
        why = "no installed distribution provides it" if not found else f"several distributions provide it: {found}"
        fail(
            f"cannot tell which package to pin for module {top_level!r}: {why}; "
            "install it, or name it with requires: '<distribution>==<version>'"
        )
    return found[0]


@cache
def _top_level_distributions() -> Mapping[str, list[str]]:
    return packages_distributions()
