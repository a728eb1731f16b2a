"""Build member architectures, verify their files' digests, and load their state_dicts safely."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torchvision.models
from torch import nn

from handlers.config.archs import HF_CONFIG, HF_WEIGHTS
from handlers.config.specs import Arch, ArchiveManifest, EnsembleSpec, MemberSpec, StateDictRules
from handlers.errors import IntegrityError, MemberLoadError
from handlers.weights.checkpoints import (
    CheckpointError,
    Fitted,
    Target,
    WeightsDoNotFit,
    fit_weights,
    read_checkpoint,
    remap_keys,
    saved_versions,
    select_weights,
)
from handlers.weights.diagnosis import explain

# Per zoo, the constructor arguments that load pretrained weights (by downloading them, or from a file of their own).
DOWNLOADING_KWARGS = {
    "torchvision": ("weights", "pretrained", "weights_backbone", "pretrained_backbone"),
    "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
}


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


def source_digest(member: MemberSpec, base_dir: Path) -> str:
    """The sha256 of the member's weights file, refused when ensembles.yaml pins another one."""
    actual = sha256_of(base_dir / member.weights)
    if member.sha256 is not None and member.sha256 != actual:
        raise IntegrityError(f"member {member.name!r}: {member.weights}: sha256 {actual} != pinned {member.sha256}")
    return actual


def build_member(member: MemberSpec, base_dir: Path) -> nn.Module:
    """Instantiate the member's architecture with random weights (never downloads any).

    torchvision's detection and segmentation builders would fetch an ImageNet backbone even with
    `weights=None`, so `weights_backbone=None` is passed wherever a builder takes it; timm models are
    created with `pretrained=False`, Hugging Face models from their folder's config.json alone. kwargs that ask
    a zoo for pretrained weights are refused: a member's weights come from its `weights:` file only. A package's
    class or factory is called with the member's kwargs (its code runs: SECURITY.md says who allows which).
    """
    arch = Arch.parse(member.arch)
    asked = sorted(set(member.kwargs) & set(DOWNLOADING_KWARGS.get(arch.kind, ())))
    if asked:
        raise MemberLoadError(
            f"member {member.name!r}: kwargs {asked} would make {arch.kind} load pretrained weights; "
            "remove them: a member's weights come only from its `weights:` file"
        )
    built: nn.Module
    try:
        if arch.kind == "torchvision":
            builder = torchvision.models.get_model_builder(arch.name)
            backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
            built = builder(weights=None, **backbone, **member.kwargs)
        elif arch.kind == "timm":
            import timm

            built = timm.create_model(arch.name, pretrained=False, **member.kwargs)
        elif arch.kind == "transformers":
            built = _hugging_face_model(base_dir / arch.target, member.kwargs)
        elif arch.kind == "package":
            built = getattr(importlib.import_module(arch.target), arch.name)(**member.kwargs)
        else:
            built = getattr(_import_file(base_dir / arch.target), arch.name)(**member.kwargs)
    except Exception as e:  # Any failure to construct is reported against the member that caused it.
        raise MemberLoadError(
            f"member {member.name!r}: cannot build {member.arch} with {dict(member.kwargs)}: {e}"
        ) from e
    return built


def load_member(member: MemberSpec, base_dir: Path) -> tuple[nn.Module, Fitted]:
    """Build the member and load its weights strictly (`weights_only=True` or safetensors), in eval mode; the
    fitted weights say what torch's loading rules filled or dropped, for the member's provenance."""
    module = build_member(member, base_dir)
    fitted = member_weights(member, base_dir, module)
    module.load_state_dict(fitted.state, strict=True)
    return module.eval(), fitted


def load_archived_members(manifest: ArchiveManifest, model_dir: Path) -> list[nn.Module]:
    """The members of an extracted archive, after every listed file's digest is verified: nothing loads before.

    Each member's weights (and model file) must be pinned in the manifest, by the same digest its spec records.
    """
    spec = manifest.ensemble
    for member in spec.members:
        pinned = {member.weights, *([member.arch_file] if member.arch_file else [])}
        unpinned = sorted(pinned - set(manifest.digests))
        if unpinned:
            raise IntegrityError(f"member {member.name!r}: the manifest pins no digest for {unpinned}")
        if manifest.digests[member.weights] != member.sha256:
            raise IntegrityError(f"member {member.name!r}: the manifest gives two digests for {member.weights}")
    verify_digests(model_dir, manifest.digests, owners={member.weights: member.name for member in spec.members})
    return [load_member(member, model_dir)[0] for member in spec.members]


def load_source_members(spec: EnsembleSpec) -> tuple[EnsembleSpec, list[nn.Module], dict[str, dict[str, Any]]]:
    """The members straight from ensembles.yaml's paths (evaluation, in-process references), pinned digests checked.

    Returns the spec with each member's source digest, the modules, and each member's source record
    (file, sha256, rules, and what torch's loading rules filled or dropped).
    """
    digested = tuple(replace(m, sha256=source_digest(m, spec.base_dir)) for m in spec.members)
    loaded = [load_member(member, spec.base_dir) for member in spec.members]
    sources = {
        m.name: {"file": m.weights, "sha256": m.sha256, "state_dict": m.state_dict.to_dict(), **fitted.record()}
        for m, (_, fitted) in zip(digested, loaded, strict=True)
    }
    return replace(spec, members=digested), [module for module, _ in loaded], sources


def member_weights(member: MemberSpec, base_dir: Path, module: nn.Module) -> Fitted:
    """The member's weights as one flat state_dict that fits `module`: picked, renamed and cast by its rules,
    with what torch's own loading rules filled (a pre-0.4.1 BatchNorm's `num_batches_tracked`) or dropped.

    When they do not fit, the error names the member, counts what is missing, unexpected or of
    another shape with a few examples, and proposes the `state_dict:` block that fixes it.
    """
    where = f"member {member.name!r}: {member.weights}"
    try:
        content = read_checkpoint(base_dir / member.weights)
    except CheckpointError as e:
        raise MemberLoadError(f"{where}: {e}") from e
    target = Target.of(module)
    rules = member.state_dict
    arch = Arch.parse(member.arch)
    if (
        arch.kind == "transformers"
        and rules == StateDictRules()
        and isinstance(content, dict)
        and set(content) != set(target.state)
    ):
        content = _published_hugging_face_state(where, base_dir / arch.target, base_dir / member.weights)
    try:
        return fit_weights(
            remap_keys(select_weights(content, rules.key), rules), target, saved_versions(content, rules.key)
        )
    except CheckpointError as e:
        what = f"weights do not fit {member.arch} (strict loading): {e}" if isinstance(e, WeightsDoNotFit) else str(e)
        raise MemberLoadError(f"{where}: {what}{explain(content, target, member.state_dict)}") from e


def _published_hugging_face_state(where: str, folder: Path, weights: Path) -> dict[str, Any]:
    """A save_pretrained checkpoint's weights under the module's own names.

    transformers 5 writes its checkpoints in the original key layout (`vit.encoder.layer.0.attention.attention.query`)
    and converts them when loading (renames, and fused or split tensors). Its own loader reads the
    safetensors file (no pickle) and must account for every key: nothing missing, unexpected or of another
    shape, as `strict=True` would demand. The archive then stores the result under the module's names.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    with tempfile.TemporaryDirectory() as folder_copy:
        shutil.copyfile(folder / HF_CONFIG, Path(folder_copy) / HF_CONFIG)
        (Path(folder_copy) / HF_WEIGHTS).symlink_to(weights.resolve())
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            folder_copy, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    problems = {kind: sorted(map(str, keys))[:5] for kind, keys in info.items() if keys}
    if problems:
        raise MemberLoadError(f"{where}: the weights do not fit {folder / HF_CONFIG}: {problems}")
    state: dict[str, Any] = model.state_dict()
    return state


def _hugging_face_model(folder: Path, kwargs: Mapping[str, Any]) -> nn.Module:
    """An image classifier built from a save_pretrained folder's config.json, offline, with random weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    # transformers leaves from_config unannotated.
    model: nn.Module = transformers.AutoModelForImageClassification.from_config(  # type: ignore[no-untyped-call]
        config, **kwargs
    )
    return model


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
