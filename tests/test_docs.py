"""The docs site's schema reference: the hook's Markdown for a pydantic-v2-style schema, and the hook inside a real
build."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "docs" / "hooks" / "schema_reference.py"


def _load_hook() -> ModuleType:
    """The hook by its path, as mkdocs loads it: docs/ is no package, and a `docs` on sys.path must not shadow it."""
    spec = importlib.util.spec_from_file_location("schema_reference", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_schema = _load_hook().render_schema

# What pydantic v2's model_json_schema() writes for frozen, extra="forbid" models: $defs and $ref, anyOf for
# optional fields, enum for Literal and Enum, const for a one-value Literal, prefixItems for a tuple; and what a
# model's json_schema_extra adds for cross-key rules: allOf of if/then/else, anyOf of required keys, named maps.
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "Unused": {"description": "Reached from no key, so listed last.", "type": "string"},
        "Task": {
            "description": "What the members predict.",
            "enum": ["binary", "multilabel"],
            "title": "Task",
            "type": "string",
        },
        "Member": {
            "additionalProperties": False,
            "description": "One model.\n\nIts weights are pinned.",
            "properties": {
                "name": {"pattern": "^[a-z]+(_[a-z]+)*$|^x$", "title": "Name", "type": "string"},
                "weight": {
                    "default": 1.0,
                    "description": "Its weight in `mean`: w | 0 < w.",
                    "exclusiveMinimum": 0,
                    "title": "Weight",
                    "type": "number",
                },
                "kwargs": {"additionalProperties": True, "default": {}, "title": "Kwargs", "type": "object"},
                "sha256": {
                    "anyOf": [{"maxLength": 64, "minLength": 64, "type": "string"}, {"type": "null"}],
                    "default": None,
                    "title": "Sha256",
                },
                "tags": {
                    "additionalProperties": {"type": "string"},
                    "maxProperties": 4,
                    "propertyNames": {"pattern": "^[a-z]+$"},
                    "type": "object",
                },
            },
            "required": ["name"],
            "allOf": [
                {"not": {"properties": {"name": {"const": "x"}}, "required": ["name"]}},
                {
                    "if": {"properties": {"weight": {"exclusiveMaximum": 1}}},
                    "then": {"properties": {"tags": {"type": "object"}}},
                },
            ],
            "title": "Member",
            "type": "object",
        },
        "Spec": {
            "additionalProperties": False,
            "description": "One ensemble, served as <name>.",
            "properties": {
                "version": {"description": "A quoted\n   string.", "title": "Version", "type": "string"},
                "task": {"$ref": "#/$defs/Task"},
                "kind": {"const": "image", "default": "image", "title": "Kind", "type": "string"},
                "size": {
                    "maxItems": 2,
                    "minItems": 2,
                    "prefixItems": [{"minimum": 8, "type": "integer"}, {"maximum": 4096, "type": "integer"}],
                    "title": "Size",
                    "type": "array",
                },
                "labels": {
                    "items": {"type": "string"},
                    "maxItems": 64,
                    "minItems": 1,
                    "title": "Labels",
                    "type": "array",
                },
                "positive_label": {"type": "string"},
                "threshold": {
                    "anyOf": [{"maximum": 1, "minimum": 0, "type": "number"}, {"type": "null"}],
                    "default": None,
                    "title": "Threshold",
                },
                "members": {"items": {"$ref": "#/$defs/Member"}, "minItems": 1, "title": "Members", "type": "array"},
                "input": {
                    "$ref": "#/$defs/Member",
                    "anyOf": [
                        {"required": ["size"]},
                        {"properties": {"kind": {"const": "tensor"}}, "required": ["kind"]},
                    ],
                },
                "extra": {"type": ["string", "integer"], "title": "Extra"},
                "anything": {"title": "Anything", "description": "`<kept>` in code, <escaped> outside."},
            },
            "required": ["version", "task", "members"],
            "allOf": [
                {
                    "if": {"properties": {"task": {"const": "binary"}}},
                    "then": {"properties": {"labels": {"maxItems": 2, "minItems": 2}}, "required": ["positive_label"]},
                    "else": {"not": {"required": ["positive_label"]}},
                },
                {
                    "if": {"properties": {"task": {"enum": ["multilabel"]}}, "required": ["task"]},
                    "then": {"properties": {"threshold": {"minimum": 0.1}}},
                },
            ],
            "title": "Spec",
            "type": "object",
        },
    },
    "additionalProperties": {"$ref": "#/$defs/Spec"},
    "description": "The whole file.",
    "properties": {
        "ensembles": {
            "description": "By name.",
            "minProperties": 1,
            "patternProperties": {"^[a-z]+$": {"$ref": "#/$defs/Spec"}},
            "propertyNames": {"pattern": "^[a-z]+$"},
            "title": "Ensembles",
            "type": "object",
        },
        "aliases": {"additionalProperties": {"type": "string"}, "type": "object"},
    },
    "required": ["ensembles"],
    "title": "File",
    "type": "object",
}

REFERENCE = (
    """\
## File { #File }

The whole file.

| key | type | required | default | description |
|---|---|---|---|---|
| `ensembles` | map (at least 1 entry) of names matching `^[a-z]+$` to [Spec](#Spec) | yes |  | By name. |
| `aliases` | map of names to string | no |  |  |

Other keys: [Spec](#Spec).

## Spec { #Spec }

One ensemble, served as &lt;name&gt;.

| key | type | required | default | description |
|---|---|---|---|---|
| `version` | string | yes |  | A quoted string. |
| `task` | [Task](#Task) | yes |  |  |
| `kind` | `"image"` | no | `"image"` |  |
| `size` | [integer (≥ 8), integer (≤ 4096)] | no |  |  |
| `labels` | list (1 to 64 items) of string | no |  |  |
| `positive_label` | string | no |  |  |
| `threshold` | number (≥ 0, ≤ 1) or null | no | `null` |  |
| `members` | list (at least 1 item) of [Member](#Member) | yes |  |  |
| `input` | [Member](#Member), where `size` is required or `kind` is `"tensor"` | no |  |  |
| `extra` | string or integer | no |  |  |
| `anything` | any | no |  | `<kept>` in code, &lt;escaped&gt; outside. |

Rules:

- If `task` is `"binary"`: `positive_label` is required and `labels` has exactly 2 items; """
    """otherwise `positive_label` is not allowed.
- If `task` is required and `task` is one of `"multilabel"`: `threshold` is ≥ 0.1.

No other keys are allowed.

## Task { #Task }

What the members predict.

Type: one of `"binary"`, `"multilabel"`.

## Member { #Member }

One model.

Its weights are pinned.

| key | type | required | default | description |
|---|---|---|---|---|
| `name` | string (matching `^[a-z]+(_[a-z]+)*$|^x$`) | yes |  |  |
| `weight` | number (> 0) | no | `1.0` | Its weight in `mean`: w \\| 0 &lt; w. |
| `kwargs` | object | no | `{}` |  |
| `sha256` | string (exactly 64 characters) or null | no | `null` |  |
| `tags` | map (at most 4 entries) of names matching `^[a-z]+$` to string | no |  |  |

Rules:

- not (`name` is `"x"`).
- If `weight` is < 1: `tags` is object.

No other keys are allowed.

## Unused { #Unused }

Reached from no key, so listed last.

Type: string.
"""
)


def test_schema_renders_as_linked_tables() -> None:
    assert render_schema(SCHEMA) == REFERENCE


MKDOCS_YML = f"""\
site_name: reference
docs_dir: docs
site_dir: site
hooks:
  - {HOOK}
markdown_extensions:
  - attr_list
  - tables
validation:
  anchors: warn
"""


@pytest.mark.parametrize(
    ("schema", "exit_code", "message"),
    [
        pytest.param(SCHEMA, 0, "Documentation built in", id="built"),
        pytest.param(None, 1, "reference.md: the schema file.schema.json is missing", id="schema-missing"),
    ],
)
def test_the_hook_writes_the_reference_in_a_strict_build(
    tmp_path: Path, schema: dict | None, exit_code: int, message: str
) -> None:
    """A real `mkdocs build --strict` with the hook: the links between sections resolve, and no schema fails the
    build."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reference.md").write_text("# Reference\n\n<!-- schema-reference: file.schema.json -->\n")
    (tmp_path / "mkdocs.yml").write_text(MKDOCS_YML)
    if schema is not None:
        (tmp_path / "file.schema.json").write_text(json.dumps(schema))
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert built.returncode == exit_code, built.stderr
    assert message in built.stderr
    if schema is not None:
        page = (tmp_path / "site" / "reference" / "index.html").read_text()
        assert [anchor for anchor in ("File", "Spec", "Task", "Member", "Unused") if f'id="{anchor}"' not in page] == []
        assert '<a href="#Member">Member</a>' in page
