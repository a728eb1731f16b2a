"""mkdocs hook: write a JSON Schema (pydantic v2's form) into a page as Markdown tables.

A page asks for it with `<!-- schema-reference: <path from mkdocs.yml's folder> -->`; the comment is
replaced by one section per definition, the root first and then every definition in the order the
root's keys first reach it, each with a table of its keys, its cross-key rules (`allOf` of
`if`/`then`/`else`) and links between the sections. The reference is written from the schema at every
build, so it cannot drift from the validation that the schema is generated from; a missing schema fails
the build.
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
# What makes a subschema a type rather than a condition on keys (`required`, `properties`, `not`).
TYPE_KEYS = {"type", "$ref", "const", "enum", "anyOf", "items", "prefixItems"}
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
    """One definition: a heading its links point at, its description, its keys or its type, and its rules."""
    parts = [f"## {name} {{ #{name} }}"]
    if "description" in schema:
        parts.append(_text(schema["description"].strip()))
    if "properties" not in schema:
        parts.append(f"Type: {_type(schema)}.")
        return "\n\n".join(parts)
    required = set(schema.get("required", ()))
    rows = ["| key | type | required | default | description |", "|---|---|---|---|---|"]
    for key, value in schema["properties"].items():
        default = f"`{json.dumps(value['default'])}`" if "default" in value else ""
        description = _text(" ".join(value.get("description", "").split()), cell=True)
        rows.append(f"| `{key}` | {_type(value)} | {'yes' if key in required else 'no'} | {default} | {description} |")
    parts.append("\n".join(rows))
    if "allOf" in schema:
        parts.append("Rules:\n\n" + "\n".join(f"- {_rule(rule)}" for rule in schema["allOf"]))
    extra = schema.get("additionalProperties")
    if extra is False:
        parts.append("No other keys are allowed.")
    elif isinstance(extra, dict):
        parts.append(f"Other keys: {_type(extra)}.")
    return "\n\n".join(parts)


def _type(schema: Schema) -> str:
    """A schema's type in words, with links to the definitions it names and its constraints in brackets."""
    options = schema.get("anyOf", [])
    conditions = [option for option in options if not TYPE_KEYS & set(option)]
    types = [option for option in options if TYPE_KEYS & set(option)]
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        text = f"[{name}](#{name})"
    elif types:
        text = " or ".join(_type(option) for option in types)
    elif "const" in schema:
        text = f"`{json.dumps(schema['const'])}`"
    elif "enum" in schema:
        text = "one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    elif schema.get("type") == "array":
        text = _array(schema)
    elif schema.get("type") == "object" and (
        "patternProperties" in schema or isinstance(schema.get("additionalProperties"), dict)
    ):
        text = _map(schema)
    elif isinstance(schema.get("type"), list):
        text = " or ".join(schema["type"])
    else:
        text = schema.get("type", "any")
    constraints = _constraints(schema)
    text = f"{text} ({', '.join(constraints)})" if constraints else text
    return f"{text}, where {' or '.join(_condition(option) for option in conditions)}" if conditions else text


def _array(schema: Schema) -> str:
    """A fixed tuple as `[a, b]`; a list with its length bounds before its items' type, so they read apart."""
    if "prefixItems" in schema:
        return "[" + ", ".join(_type(item) for item in schema["prefixItems"]) + "]"
    length = _length(schema.get("minItems"), schema.get("maxItems"), ("item", "items"))
    bounded = f"list ({length[0]})" if length else "list"
    return f"{bounded} of {_type(schema.get('items', {}))}"


def _map(schema: Schema) -> str:
    """An object keyed by names: its size, the pattern its names match, and its values' type."""
    length = _length(schema.get("minProperties"), schema.get("maxProperties"), ("entry", "entries"))
    bounded = f"map ({length[0]})" if length else "map"
    values = [
        f"names matching `{pattern}` to {_type(value)}"
        for pattern, value in schema.get("patternProperties", {}).items()
    ]
    if isinstance(schema.get("additionalProperties"), dict):
        names = schema.get("propertyNames", {}).get("pattern")
        values.append(
            f"names matching `{names}` to {_type(schema['additionalProperties'])}"
            if names
            else f"names to {_type(schema['additionalProperties'])}"
        )
    return f"{bounded} of {' and '.join(values)}"


def _constraints(schema: Schema) -> list[str]:
    """Bounds of numbers and strings in words (a list's length is `_array`'s, a map's size `_map`'s)."""
    found = []
    for key, words in (
        ("minimum", "≥ {}"),
        ("exclusiveMinimum", "> {}"),
        ("maximum", "≤ {}"),
        ("exclusiveMaximum", "< {}"),
    ):
        if key in schema:
            found.append(words.format(schema[key]))
    found += _length(schema.get("minLength"), schema.get("maxLength"), ("character", "characters"))
    if "pattern" in schema:
        found.append(f"matching `{schema['pattern']}`")
    return found


def _length(low: int | None, high: int | None, unit: tuple[str, str]) -> list[str]:
    """A size range in words with its unit (singular, plural): "exactly 1 item", "2 to 4 items", "at least 1 entry"."""

    def count(number: int) -> str:
        return f"{number} {unit[0] if number == 1 else unit[1]}"

    if low is not None and high is not None:
        return [f"exactly {count(low)}" if low == high else f"{low} to {count(high)}"]
    if low is not None:
        return [f"at least {count(low)}"]
    return [f"at most {count(high)}"] if high is not None else []


def _rule(rule: Schema) -> str:
    """A cross-key rule of `allOf`: "If <if>: <then>; otherwise <else>." or a plain condition."""
    if "if" not in rule:
        return f"{_condition(rule)}."
    text = f"If {_condition(rule['if'])}: {_condition(rule['then'])}"
    return f"{text}; otherwise {_condition(rule['else'])}." if "else" in rule else f"{text}."


def _condition(schema: Schema) -> str:
    """A subschema that only constrains keys (`required`, `properties`, `not`) in words."""
    properties = schema.get("properties", {})
    parts = [f"`{key}` is required" for key in schema.get("required", ()) if "const" not in properties.get(key, {})]
    parts += [_about(key, value) for key, value in properties.items()]
    if "not" in schema:
        negated = schema["not"]
        only_required = set(negated) == {"required"}
        parts += (
            [f"`{key}` is not allowed" for key in negated["required"]]
            if only_required
            else [f"not ({_condition(negated)})"]
        )
    return " and ".join(parts)


def _about(key: str, schema: Schema) -> str:
    """What a condition says about one key's value: `task` is "binary", `labels` has exactly 2 items."""
    words = [f"is `{json.dumps(schema['const'])}`"] if "const" in schema else []
    words += (
        ["is one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])] if "enum" in schema else []
    )
    words += [f"has {length}" for length in _length(schema.get("minItems"), schema.get("maxItems"), ("item", "items"))]
    words += [f"is {constraint}" for constraint in _constraints(schema)]
    return f"`{key}` " + " and ".join(words or [f"is {_type(schema)}"])


def _text(text: str, *, cell: bool = False) -> str:
    """Description text shown literally: `<name>` would be read as an HTML tag and, in a table, a pipe would end
    the cell; code spans keep both as they are."""
    escapes = {"<": "&lt;", ">": "&gt;", "|": "\\|" if cell else "|"}
    return re.sub(r"(`[^`]*`)|[<>|]", lambda match: match[1] or escapes[match[0]], text)
