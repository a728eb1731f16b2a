"""mkdocs hook: write a JSON Schema (pydantic v2's form) into a page as Markdown tables.

A page asks for it with `<!-- schema-reference: <path from mkdocs.yml's folder> -->`; the comment is
replaced by one section per definition, the root first and then every definition in the order the
root's keys first reach it, each with a table of its keys and links between the sections. The
reference is written from the schema at every build, so it cannot drift from the validation that the
schema is generated from; a missing schema fails the build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

MARKER = re.compile(r"<!-- schema-reference: (?P<path>\S+) -->")
REF_PREFIX = "#/$defs/"
Schema = dict[str, Any]


def on_page_markdown(markdown: str, /, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace each schema-reference comment of the page with the schema's reference."""

    def reference(match: re.Match[str]) -> str:
        path = Path(config.config_file_path).parent / match["path"]
        if not path.is_file():
            raise PluginError(f"{page.file.src_path}: the schema {match['path']} is missing ({path})")
        return render_schema(json.loads(path.read_text()))

    return MARKER.sub(reference, markdown)


def render_schema(schema: Schema) -> str:
    """The schema as Markdown: the root's section, then one section per definition it reaches, then any others."""
    definitions: dict[str, Schema] = schema.get("$defs", {})
    root = schema.get("title", "root")
    order = [root]
    pending = [schema]
    while pending:
        for name in _refs(pending.pop(0)):
            if name not in order:
                order.append(name)
                pending.append(definitions[name])
    order += sorted(set(definitions) - set(order))
    return "\n\n".join(_section(name, schema if name == root else definitions[name]) for name in order) + "\n"


def _refs(schema: Any) -> list[str]:
    """Names of the definitions a schema refers to, in the order they appear (depth first)."""
    if isinstance(schema, dict):
        own = [schema["$ref"].removeprefix(REF_PREFIX)] if "$ref" in schema else []
        return own + [name for key, value in schema.items() if key not in ("$defs", "default") for name in _refs(value)]
    if isinstance(schema, list):
        return [name for item in schema for name in _refs(item)]
    return []


def _section(name: str, schema: Schema) -> str:
    """One definition: a heading its links point at, its description, and its keys or its type."""
    parts = [f"## {name} {{ #{name} }}"]
    if "description" in schema:
        parts.append(schema["description"].strip())
    if "properties" not in schema:
        parts.append(f"Type: {_type(schema)}.")
        return "\n\n".join(parts)
    required = set(schema.get("required", ()))
    rows = ["| key | type | required | default | description |", "|---|---|---|---|---|"]
    for key, value in schema["properties"].items():
        default = f"`{json.dumps(value['default'])}`" if "default" in value else ""
        description = _cell(" ".join(value.get("description", "").split()))
        rows.append(f"| `{key}` | {_type(value)} | {'yes' if key in required else 'no'} | {default} | {description} |")
    parts.append("\n".join(rows))
    extra = schema.get("additionalProperties")
    if extra is False:
        parts.append("No other keys are allowed.")
    elif isinstance(extra, dict):
        parts.append(f"Other keys: {_type(extra)}.")
    return "\n\n".join(parts)


def _type(schema: Schema) -> str:
    """A schema's type in words, with links to the definitions it names and its constraints in brackets."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        text = f"[{name}](#{name})"
    elif "anyOf" in schema:
        text = " or ".join(_type(option) for option in schema["anyOf"])
    elif "const" in schema:
        text = f"`{json.dumps(schema['const'])}`"
    elif "enum" in schema:
        text = "one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    elif schema.get("type") == "array":
        text = _array(schema)
    elif schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        text = f"map of names to {_type(schema['additionalProperties'])}"
    elif isinstance(schema.get("type"), list):
        text = " or ".join(schema["type"])
    else:
        text = schema.get("type", "any")
    constraints = _constraints(schema)
    return f"{text} ({', '.join(constraints)})" if constraints else text


def _array(schema: Schema) -> str:
    """A fixed tuple as `[a, b]`; a list with its length bounds before its items' type, so they read apart."""
    if "prefixItems" in schema:
        return "[" + ", ".join(_type(item) for item in schema["prefixItems"]) + "]"
    length = _length(schema.get("minItems"), schema.get("maxItems"), "item")
    bounded = f"list ({length[0]})" if length else "list"
    return f"{bounded} of {_type(schema['items'])}" if "items" in schema else bounded


def _constraints(schema: Schema) -> list[str]:
    """Bounds of numbers and strings in words (a list's length is `_array`'s)."""
    found = []
    for key, words in (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}")):
        if key in schema:
            found.append(words.format(schema[key]))
    found += _length(schema.get("minLength"), schema.get("maxLength"), "character")
    if "pattern" in schema:
        found.append(f"matching `{schema['pattern']}`")
    return found


def _length(low: int | None, high: int | None, unit: str) -> list[str]:
    """A length range in words, `unit` singular: "exactly 1 item", "2 to 4 items", "at most 64 characters"."""
    if low is not None and high is not None:
        return [f"exactly {_count(low, unit)}" if low == high else f"{low} to {_count(high, unit)}"]
    if low is not None:
        return [f"at least {_count(low, unit)}"]
    return [f"at most {_count(high, unit)}"] if high is not None else []


def _count(number: int, unit: str) -> str:
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"


def _cell(text: str) -> str:
    """Text safe in a table cell: a pipe would end the cell, except inside a code span, where Markdown keeps it."""
    return re.sub(r"(`[^`]*`)|\|", lambda match: match[1] or "\\|", text)
