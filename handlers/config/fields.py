"""Field kinds for the config models: pydantic constraints for the JSON Schema, checks that say what was expected.

Each kind is the metadata of an annotation, `Annotated[type, *kind(...)]`: `Field(constraints)` and then
`BeforeValidator(check)`. The constraints go into ensembles.schema.json; the check runs first, so a wrong value is
reported in the files' own words with the whole rule ("expected an integer from 1 to 1024, got 0"), not pydantic's
one violated bound. A key that may be absent is `Annotated[type | None, *kind(...)]`: the default None is never
checked, while a null written in a file fails the kind's check.
A check fails with `fail(message, *at)`: `at` is a key path below the value checked, which the loader
appends to pydantic's location, so a rule checked by a parent still names the child key that broke it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, NoReturn, TypeGuard, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetCoreSchemaHandler, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, PydanticCustomError

ERROR_TYPE = "config"
T = TypeVar("T")
# A kind's metadata: its constraints, then its check.
Kind = tuple[FieldInfo, BeforeValidator]


def fail(message: str, *at: str | int) -> NoReturn:
    """Reject a value; `at` is the key path below the value being checked where the rule broke."""
    raise PydanticCustomError(ERROR_TYPE, message, {"at": at})


def within(prefix: tuple[str | int, ...], check: Callable[[], T]) -> T:
    """Run a child's `check` from its parent, so that a failure names the child's key path under `prefix`."""
    try:
        return check()
    except PydanticCustomError as e:
        raise PydanticCustomError(
            e.type, e.message_template, {"at": (*prefix, *(e.context or {}).get("at", ()))}
        ) from None


def mapping(value: Any) -> dict[Any, Any]:
    """A file's mapping; a list or a scalar (or null) where a mapping belongs is named by its type."""
    if not isinstance(value, dict):
        fail(f"expected a mapping, got {type(value).__name__}")
    return value


class Strict(BaseModel):
    """A mapping in a config file: frozen, no unknown key, every required key present, in the files' words."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def allowed_keys(cls, data: dict[Any, Any]) -> tuple[list[str], list[str]]:
        """(valid, required) keys of this mapping; a model whose keys depend on a value (input `type`) overrides it."""
        return sorted(cls.model_fields), sorted(name for name, field in cls.model_fields.items() if field.is_required())

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        valid, required = cls.allowed_keys(mapping(data))
        for key in data:
            if key not in valid:
                fail(f"unknown key; valid keys here: {', '.join(valid)}", key)
        for key in required:
            if key not in data:
                fail(f"missing key {key!r}")
        return data


def _kind(check: Callable[[Any], Any], **constraints: Any) -> Kind:
    field: FieldInfo = Field(**constraints)
    return field, BeforeValidator(check)


class LiteralOf:
    """A `str` field validated, and described in the JSON Schema, as `Literal[*options]`: options known at run time.

    It replaces the annotated type's schema, so it annotates `str`, never `str | None`.
    """

    def __init__(self, options: Sequence[str]) -> None:
        self.options = tuple(options)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return handler(Literal[self.options])


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def expect_integer(value: Any, low: int, high: int | None) -> int:
    """`value` if it is an integer in [low, high] (true and false are not), else the failure that says so."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
        fail(f"expected {expected}, got {value!r}")
    return value


def integer(low: int, high: int | None = None) -> Kind:
    """An integer in [low, high]; without `high`, at least `low`."""
    return _kind(lambda value: expect_integer(value, low, high), ge=low, le=high)


def number(low: float, high: float, *, low_open: bool = False) -> Kind:
    """A finite number in [low, high], or (low, high] with `low_open`."""

    def check(value: Any) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > high or value < low or (low_open and value == low):
            fail(f"expected a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
        return value

    bounds = {"gt": low} if low_open else {"ge": low}
    return _kind(check, le=high, allow_inf_nan=False, **bounds)


def boolean() -> Kind:
    """true or false: YAML's yes/no strings and numbers are not booleans here."""

    def check(value: Any) -> Any:
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
        return value

    return _kind(check)


def choice(options: Sequence[str], *, unknown: str | None = None) -> tuple[LiteralOf, FieldInfo, BeforeValidator]:
    """One of `options`, annotating `str`.

    `unknown` names the thing in the message ("unknown image format 'XCF'; known: ...").
    """

    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in options:
            if unknown:
                fail(f"unknown {unknown} {value!r}; known: {', '.join(options)}")
            fail(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return LiteralOf(options), *_kind(check)


def text(pattern: str | None = None, what: str = "a string") -> Kind:
    """A non-empty string, matching `pattern` whole when given; `what` says what was expected."""

    def check(value: Any) -> Any:
        if not isinstance(value, str) or not value or (pattern is not None and not re.fullmatch(pattern, value)):
            fail(f"expected {what}, got {value!r}")
        return value

    return _kind(check, min_length=1, pattern=None if pattern is None else f"^(?:{pattern})$")


def regex() -> Kind:
    """A Python regular expression, compiled now so a typo fails the file, not a later load."""

    def check(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            fail(f"expected a regular expression, got {value!r}")
        try:
            re.compile(value)
        except re.error as e:
            fail(f"invalid regular expression {value!r}: {e}")
        return value

    return _kind(check, min_length=1)


def listed(expected: str, *, min_len: int, max_len: int | None = None, echo: bool = True) -> Kind:
    """A list, annotating `tuple[item, ...]`, `min_len` to `max_len` long.

    `expected` is the whole phrase ('a list of 2 integers').

    `echo=False` leaves the value out of the message: a list of mappings (members) would repeat half the file.
    """

    def check(value: Any) -> Any:
        if not isinstance(value, list) or len(value) < min_len or (max_len is not None and len(value) > max_len):
            fail(f"expected {expected}" + (f", got {value!r}" if echo else ""))
        return value

    # Lengths go to the JSON Schema only: as a core constraint pydantic would also report a list whose item failed as
    # short.
    lengths = {"minItems": min_len} | ({} if max_len is None else {"maxItems": max_len})
    return _kind(check, json_schema_extra=lengths)


def keyed(expected: str, *, min_len: int = 0) -> Kind:
    """A mapping with string keys (annotating `dict[key, value]`), at least `min_len` of them."""

    def check(data: Any) -> Any:
        if not isinstance(data, dict) or len(data) < min_len or not all(isinstance(name, str) for name in data):
            fail(f"expected {expected}")
        return data

    return _kind(check, json_schema_extra={"minProperties": min_len} if min_len else None)
