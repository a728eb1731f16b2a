"""Reading ensembles.yaml and the archive manifest (`ensemble.json`) into validated specs, once; and
TorchServe's `config.properties`, for the scripts, tests and gateway that must find what TorchServe finds there.

ensembles.yaml and the manifest are checked by the models in schema.py. Every error names the file and the key
path, e.g. `ensembles.yaml: ensembles.shapes.members[2].arch: unknown torchvision model 'resnet19'`, one line per error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import javaproperties
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from handlers.config.fields import ERROR_TYPE
from handlers.config.schema import EnsemblesFile, ManifestFile
from handlers.config.specs import ArchiveManifest, EnsembleSpec
from handlers.errors import ConfigError

MANIFEST_NAME = "ensemble.json"
Model = TypeVar("Model", bound=BaseModel)


def load_ensembles(path: Path, *, check_files: bool = True) -> dict[str, EnsembleSpec]:
    """Read ensembles.yaml. `check_files=False` skips weight-file existence (training writes them)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path.name}: cannot read: {e}") from e
    return _validate(EnsemblesFile, raw, path.name, base_dir=path.parent, check_files=check_files).to_specs(path.parent)


def read_properties(source: Path | str) -> dict[str, str]:
    """The settings of a Java `.properties` file (a Path) or text (a str), read by java.util.Properties' rules.

    TorchServe reads its config.properties with java.util.Properties: `#` and `!` comments, `=`, `:` or blank
    separators, continued lines and escapes all count, so a script that split lines on `=` could see other settings
    than the server. A file is read as Latin-1, as Properties.load reads a stream.
    """
    name = source.name if isinstance(source, Path) else "properties text"
    try:
        return javaproperties.loads(source.read_text(encoding="latin-1") if isinstance(source, Path) else source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read: {e}") from e


def read_archive_manifest(model_dir: Path) -> ArchiveManifest:
    """Read and validate the manifest a TorchServe model directory carries."""
    try:
        raw = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{MANIFEST_NAME}: cannot read: {e}") from e
    return _validate(ManifestFile, raw, MANIFEST_NAME, base_dir=model_dir, check_files=True).to_manifest(model_dir)


def _validate(model: type[Model], raw: Any, source: str, *, base_dir: Path, check_files: bool) -> Model:
    """`raw` checked by `model`, or one ConfigError with a line per error, each naming `source` and the key path."""
    try:
        return model.model_validate(raw, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as e:
        raise ConfigError("\n".join(_line(source, error) for error in e.errors(include_url=False))) from None


def _line(source: str, error: ErrorDetails) -> str:
    at = error.get("ctx", {}).get("at", ()) if error["type"] == ERROR_TYPE else ()
    path = key_path((*error["loc"], *at))
    return f"{source}: {path}: {error['msg']}" if path else f"{source}: {error['msg']}"


def key_path(loc: tuple[str | int, ...]) -> str:
    """pydantic's location as the files' key path, `ensembles.shapes.members[2].arch` (without the `[key]` of a key's
    check)."""
    path = ""
    for part in loc:
        if part == "[key]":
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path
