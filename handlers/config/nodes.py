"""A value from a config file with its key path, so every check can say where it failed."""

from __future__ import annotations

import math
import re
from collections.abc import Set as AbstractSet
from typing import Any

from handlers.errors import ConfigError


class Node:
    """A value from a config file with its key path, so every check can say where it failed."""

    def __init__(self, value: Any, path: str, source: str) -> None:
        self.value = value
        self.path = path
        self.source = source

    def fail(self, message: str) -> Any:
        where = f"{self.path}: " if self.path else ""
        raise ConfigError(f"{self.source}: {where}{message}")

    def __contains__(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def __getitem__(self, key: str | int) -> Node:
        if isinstance(key, int):
            return Node(self.value[key], f"{self.path}[{key}]", self.source)
        if key not in self:
            self.fail(f"missing key {key!r}")
        return Node(self.value[key], f"{self.path}.{key}" if self.path else str(key), self.source)

    def keys(self, *, required: AbstractSet[str] = frozenset(), optional: AbstractSet[str] = frozenset()) -> None:
        """Insist on a mapping with every required key and no key outside required | optional."""
        if not isinstance(self.value, dict):
            self.fail(f"expected a mapping, got {type(self.value).__name__}")
        for key in self.value:
            if key not in required | optional:
                valid = ", ".join(sorted(required | optional))
                Node(None, f"{self.path}.{key}" if self.path else str(key), self.source).fail(
                    f"unknown key; valid keys here: {valid}"
                )
        for key in sorted(required):
            if key not in self.value:
                self.fail(f"missing key {key!r}")

    def string(self, *, pattern: re.Pattern[str] | None = None, what: str = "a string") -> str:
        if not isinstance(self.value, str) or not self.value:
            self.fail(f"expected {what}, got {self.value!r}")
        if pattern is not None and not pattern.fullmatch(self.value):
            self.fail(f"expected {what}, got {self.value!r}")
        return self.value

    def regex(self) -> re.Pattern[str]:
        try:
            return re.compile(self.string(what="a regular expression"))
        except re.error as e:
            self.fail(f"invalid regular expression {self.value!r}: {e}")

    def choice(self, options: tuple[str, ...]) -> str:
        if self.value not in options:
            self.fail(f"expected one of {', '.join(options)}, got {self.value!r}")
        return str(self.value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, got {self.value!r}")
        return self.value

    def integer(self, low: int, high: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or not low <= self.value <= high:
            self.fail(f"expected an integer from {low} to {high}, got {self.value!r}")
        return int(self.value)

    def number(self, *, low: float, high: float, low_open: bool = False) -> float:
        value = self.value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > high or value < low or (low_open and value == low):
            bound = "(" if low_open else "["
            self.fail(f"expected a number in {bound}{low}, {high}], got {value!r}")
        return float(value)

    def string_list(self, *, min_len: int) -> list[str]:
        if not isinstance(self.value, list) or len(self.value) < min_len:
            self.fail(f"expected a list of at least {min_len} string(s), got {self.value!r}")
        return [self[i].string() for i in range(len(self.value))]

    def int_list(self, *, length: int, low: int, high: int) -> list[int]:
        if not isinstance(self.value, list) or len(self.value) != length:
            self.fail(f"expected a list of {length} integers, got {self.value!r}")
        return [self[i].integer(low, high) for i in range(length)]

    def float_list(self, *, length: int, low: float, high: float) -> list[float]:
        if not isinstance(self.value, list) or len(self.value) != length:
            self.fail(f"expected a list of {length} numbers, got {self.value!r}")
        return [self[i].number(low=low, high=high) for i in range(length)]
