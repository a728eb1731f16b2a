"""The request parameters: their names, how their values are read, and the message for a misspelt one.

Every channel (query, headers, multipart fields, JSON and v2 `parameters`) carries the same names.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches

from handlers.config.policy import POLICY_PARAMETERS, parse_boolean
from handlers.errors import RequestError

# Every parameter a request may carry, on any channel: the policy's, and what else the answer shows.
REQUEST_PARAMETERS = (*POLICY_PARAMETERS, "members", "top_k", "sequence", "min_run", "uncertainty")
# Parameters that are true or false. A JSON body's `parameters` (ours or v2's, whose values are typed)
# gives them as JSON booleans or as the strings every other channel carries (boolean_parameter).
BOOLEAN_PARAMETERS = ("sequence", "early_exit", "uncertainty")


def unknown_parameters(names: Sequence[str]) -> str:
    """The message for parameter names we do not know: each with the closest valid name, then every valid name."""
    closest = [f"{name!r} -> {close[0]!r}" for name in names if (close := get_close_matches(name, REQUEST_PARAMETERS, n=1))]
    hint = f" (closest valid: {', '.join(closest)})" if closest else ""
    return f"unknown parameter(s) {sorted(names)}{hint}; valid: {', '.join(REQUEST_PARAMETERS)}"


def int_parameter(name: str, raw: str, high: int) -> int:
    """A request parameter that must be an integer from 1 to `high`, or a RequestError that says so."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        raise RequestError(f"{name} must be an integer from 1 to {high}, got {raw!r}")
    return value


def boolean_parameter(name: str, raw: str | None) -> bool:
    """A true-or-false request parameter as text (absent is false), or a RequestError naming the accepted words."""
    return raw is not None and parse_boolean(name, raw, RequestError)


def read_sequence(sequence: str | None, min_run: str | None, max_frames: int) -> int | None:
    """The debounce length a request asked for (1 without `min_run`), or None when it is no sequence."""
    if not boolean_parameter("sequence", sequence):
        if min_run is not None:
            raise RequestError("min_run needs sequence=true: it debounces a sequence of frames")
        return None
    return 1 if min_run is None else int_parameter("min_run", min_run, max_frames)
