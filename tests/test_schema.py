"""ensembles.schema.json: generated from the config models, never stale, and what every shipped ensembles file is
checked against.

check-jsonschema is the tool editors' and CI's checks are built on; the wrong copies show that it and the
models refuse the same mistake at the same key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from archive_scripts.write_schema import SCHEMA_PATH, schema_text
from handlers.config.files import load_ensembles
from handlers.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def shipped_ensembles_files() -> list[Path]:
    """Every tracked yaml file whose top level has `ensembles:`: the files users copy and edit."""
    listed = subprocess.run(
        ["git", "ls-files", "*.yaml", "*.yml"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    paths = [ROOT / name for name in listed.stdout.split()]
    # By text, not by parsing: mkdocs.yml holds a Python tag that a safe loader refuses.
    return [path for path in paths if re.search(r"^ensembles:", path.read_text(), re.MULTILINE)]


def check_jsonschema(instance: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--color", "never", "--schemafile", str(SCHEMA_PATH), str(instance.relative_to(cwd))],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_committed_schema_is_what_the_models_generate() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "ensembles.schema.json is stale: run `make schema`"


def test_the_shipped_ensembles_files_are_found() -> None:
    assert [path.relative_to(ROOT).as_posix() for path in shipped_ensembles_files()] == ["ensembles.yaml"]


def properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(model.key, property schema) for every key of every mapping in the schema."""
    for model_name, model in {"top": schema, **schema["$defs"]}.items():
        for key, prop in model["properties"].items():
            yield f"{model_name}.{key}", prop


def test_every_key_says_what_it_does_and_its_default() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    undocumented = [name for name, prop in properties(schema) if not prop.get("description")]
    defaults_unsaid = [
        name for name, prop in properties(schema) if "default" in prop and "Default:" not in prop["description"]
    ]
    assert (undocumented, defaults_unsaid) == ([], [])


@pytest.mark.parametrize("path", shipped_ensembles_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_file_names_the_schema_for_editors(path: Path) -> None:
    relative = Path(os.path.relpath(SCHEMA_PATH, path.parent)).as_posix()
    expected = f"# yaml-language-server: $schema={relative if '/' in relative else './' + relative}"
    assert path.read_text().splitlines()[0] == expected


@pytest.mark.parametrize("path", shipped_ensembles_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_check_jsonschema_accepts_the_shipped_file(path: Path) -> None:
    result = check_jsonschema(path, ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, "ok -- validation done")


def unknown_key(doc: dict[str, Any]) -> None:
    doc["ensembles"]["shapes"]["colour"] = "red"


def wrong_type(doc: dict[str, Any]) -> None:
    doc["ensembles"]["shapes"]["batching"]["workers"] = "two"


def unknown_choice(doc: dict[str, Any]) -> None:
    doc["ensembles"]["shapes"]["members"][0]["input"]["tta"] = "twenty_crop"


def binary_without_positive_label(doc: dict[str, Any]) -> None:
    del doc["ensembles"]["shapes"]["positive_label"]


SHAPES_KEYS = (
    "batching, consistency, deadline, defer, execution, input, labels, limits, members, policy, positive_label, "
    "task, top_k, version"
)


@pytest.mark.parametrize(
    ("change", "schema_error", "model_error"),
    [
        pytest.param(
            unknown_key,
            "$.ensembles.shapes: Additional properties are not allowed ('colour' was unexpected)",
            f"ensembles.shapes.colour: unknown key; valid keys here: {SHAPES_KEYS}",
            id="unknown-key",
        ),
        pytest.param(
            wrong_type,
            "$.ensembles.shapes.batching.workers: 'two' is not of type 'integer'",
            "ensembles.shapes.batching.workers: expected an integer from 1 to 64, got 'two'",
            id="wrong-type",
        ),
        pytest.param(
            unknown_choice,
            "$.ensembles.shapes.members[0].input.tta: 'twenty_crop' is not one of ['none', 'hflip', "
            "'five_crop', 'ten_crop']",
            "ensembles.shapes.members[0].input.tta: expected one of none, hflip, five_crop, ten_crop, got "
            "'twenty_crop'",
            id="unknown-choice",
        ),
        pytest.param(
            binary_without_positive_label,
            "$.ensembles.shapes: 'positive_label' is a required property",
            "ensembles.shapes: missing key 'positive_label' (required for task binary)",
            id="binary-without-positive-label",
        ),
    ],
)
def test_a_wrong_copy_is_refused_by_check_jsonschema_and_the_models_alike(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], schema_error: str, model_error: str
) -> None:
    doc = yaml.safe_load((ROOT / "ensembles.yaml").read_text())
    change(doc)
    copy = tmp_path / "ensembles.yaml"
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "archive_scripts").mkdir()
    shutil.copyfile(ROOT / "archive_scripts" / "demo_models.py", tmp_path / "archive_scripts" / "demo_models.py")
    result = check_jsonschema(copy, tmp_path)
    assert (result.returncode, result.stdout.splitlines()) == (
        1,
        ["Schema validation errors were encountered.", f"  ensembles.yaml::{schema_error}"],
    )
    with pytest.raises(ConfigError) as caught:
        load_ensembles(copy, check_files=False)
    assert str(caught.value) == f"ensembles.yaml: {model_error}"
