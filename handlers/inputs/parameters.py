"""The request parameters: each declared once, read from every channel, and resolved once against the ensemble.

A request may name a parameter on any channel: a query parameter (`/models/<name>/invoke`), an `X-Ensemble-*`
header (`_` as `-`), a multipart field, a gRPC input, or a JSON body's `parameters` (ours or a v2 request's).
`channel_parameters` and `json_parameters` read them (text from the first four, typed JSON values from the
last), `merge` joins the channels (a name given twice must agree), and `RequestParameters.resolve` turns the
result into one frozen, typed object, checked against the ensemble, that the rest of the request path reads.

Adding a parameter is one field of `RequestParameters`, declared with `parameter(...)`: the names it reads,
how their values resolve against the ensemble, and what `describe` shows (plus its row in the docs).
Every channel, the headers, the unknown-name message and `describe` follow from the declarations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from typing import Any

from handlers.config.policy import (
    DEFAULT_CONFIDENCE,
    POLICY_PARAMETERS,
    UNCERTAINTY_MEASURES,
    VOTE_POLICIES,
    PolicySpec,
    parse_boolean,
    policy_names,
    resolve_policy,
)
from handlers.config.specs import EnsembleSpec
from handlers.errors import InvalidPolicy, RequestError

# A parameter's value as a channel carries it: text (query, header, field, gRPC) or a JSON value (a body's
# `parameters`, where `members` may also be a list of names).
Sent = str | int | float | bool | list[str]
# Triton's clients send these in a v2 body's `parameters`; answers are JSON data either way, so they are ignored.
IGNORED_PARAMETERS = ("binary_data_output", "binary_data")
# The v2 outputs that carry the ranking (answers/v2.py): asking for one of them asks for top_k's default.
TOP_OUTPUTS = ("top_labels", "top_scores")


@dataclass(frozen=True)
class ParameterContext:
    """What resolving a request's parameters needs: the ensemble, whether the request came as v2 (`v2`), and the v2
    outputs it named (`v2_outputs`; None when it named none, or is no v2 request)."""

    spec: EnsembleSpec
    v2_outputs: tuple[str, ...] | None = None
    v2: bool = False


Reader = Callable[[Mapping[str, Sent], ParameterContext], Any]
Describer = Callable[[EnsembleSpec], dict[str, dict[str, Any]]]


def parameter(*names: str, read: Reader, describe: Describer) -> Any:
    """Declare a `RequestParameters` field: the request parameter `names` it reads, how, and what `describe` shows."""
    return field(metadata={"names": names, "read": read, "describe": describe})


def read_members(sent: Mapping[str, Sent], context: ParameterContext) -> tuple[int, ...]:
    """The positions of the members a request named in `members=a,b` (all without it), in declaration order."""
    names = [member.name for member in context.spec.members]
    raw = sent.get("members")
    if raw is None:
        return tuple(range(len(names)))
    asked = [name.strip() for name in raw] if isinstance(raw, list) else [name.strip() for name in str(raw).split(",")]
    valid = ", ".join(names)
    if not asked or not all(asked):  # An empty JSON list names no member, as an empty string does.
        raise RequestError(f"members must be member names separated by commas, like members={names[0]}; valid: {valid}")
    unknown = [name for name in asked if name not in names]
    if unknown:
        raise RequestError(f"unknown member(s) {unknown}; valid members: {valid}")
    twice = sorted({name for name in asked if asked.count(name) > 1})
    if twice:
        raise RequestError(f"member(s) {twice} named twice in members; name each once")
    positions = tuple(sorted(names.index(name) for name in asked))
    left_out = tuple(f"{name}." for i, name in enumerate(names) if i not in positions)
    dropped = [output for output in context.v2_outputs or () if output.startswith(left_out)] if left_out else []
    if dropped:
        raise RequestError(f"outputs {dropped} belong to members this request leaves out (members={','.join(asked)})")
    return positions


def _read_policy(sent: Mapping[str, Sent], context: ParameterContext) -> PolicySpec:
    """The request's policy, from the ensemble's default; `k` counts the members it asked for."""
    spec = context.spec
    members = read_members(sent, context)
    requested = {name: sent[name] for name in POLICY_PARAMETERS if name in sent}
    try:
        return resolve_policy(requested, default=spec.policy, task=spec.task, n_members=len(members))
    except InvalidPolicy as e:
        if len(members) == len(spec.members):
            raise
        asked = ",".join(spec.members[m].name for m in members)
        raise InvalidPolicy(
            f"{e} (k counts the {len(members)} member(s) this request asked for: members={asked})"
        ) from e


def _describe_policy(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    default = spec.policy
    described: dict[str, dict[str, Any]] = {
        "policy": {"values": policy_names(), "default": default.name},
        "k": {"range": [1, len(spec.members)], "default": default.k, "for": "k_of_n"},
    }
    if spec.task != "multiclass":
        described["threshold"] = {"range": [0.0, 1.0], "default": default.threshold}
    described["confidence"] = {
        "range": [0.0, 1.0],
        "default": default.confidence or DEFAULT_CONFIDENCE,
        "for": "cascade",
    }
    described["early_exit"] = {"values": [True, False], "default": default.early_exit, "for": ", ".join(VOTE_POLICIES)}
    return described


def _describe_members(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    names = [member.name for member in spec.members]
    return {"members": {"values": names, "default": names, "format": "comma-separated names"}}


def _read_top_k(sent: Mapping[str, Sent], context: ParameterContext) -> int | None:
    """The `top_k` a request asked for (multiclass only, 1 to the number of labels), else the ensemble's default.

    A v2 answer carries the ranking (`top_labels`, `top_scores`) only when the request names top_k or asks
    for those outputs.
    """
    spec = context.spec
    raw = sent.get("top_k")
    if raw is None:
        asks = not context.v2 or any(output in TOP_OUTPUTS for output in context.v2_outputs or ())
        return spec.top_k if asks else None
    if spec.task != "multiclass":
        raise RequestError(f"top_k applies to multiclass ensembles; this one is {spec.task}")
    return integer("top_k", raw, len(spec.labels))


def _describe_top_k(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    return {"top_k": {"range": [1, len(spec.labels)], "default": spec.top_k}} if spec.task == "multiclass" else {}


def read_sequence(sequence: Sent | None, min_run: Sent | None, max_frames: int) -> int | None:
    """The debounce length a request asked for (1 without `min_run`), or None when it is no sequence."""
    if not boolean("sequence", sequence):
        if min_run is not None:
            raise RequestError("min_run needs sequence=true: it debounces a sequence of frames")
        return None
    return 1 if min_run is None else integer("min_run", min_run, max_frames)


def _read_min_run(sent: Mapping[str, Sent], context: ParameterContext) -> int | None:
    min_run = read_sequence(sent.get("sequence"), sent.get("min_run"), context.spec.limits.max_images_per_request)
    if min_run is not None and context.v2:
        raise RequestError("sequence is for our JSON answer; read a v2 answer's label outputs frame by frame")
    return min_run


def _describe_sequence(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    return {
        "sequence": {"values": [True, False], "default": False},
        "min_run": {"range": [1, spec.limits.max_images_per_request], "default": 1, "for": "sequence=true"},
    }


def _read_uncertainty(sent: Mapping[str, Sent], context: ParameterContext) -> bool:
    """Asked for by `uncertainty=true`, or by a v2 request naming one of the measures as an output."""
    asked = boolean("uncertainty", sent.get("uncertainty"))
    return asked or not set(context.v2_outputs or ()).isdisjoint(UNCERTAINTY_MEASURES)


def _describe_uncertainty(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    return {"uncertainty": {"values": [True, False], "default": False}}


def _read_deadline(sent: Mapping[str, Sent], context: ParameterContext) -> int | None:
    """The request's deadline in milliseconds, 1 to the response timeout, else the ensemble's (None: no deadline)."""
    raw = sent.get("deadline_ms")
    if raw is None:
        return context.spec.deadline.ms
    timeout_ms = context.spec.batching.response_timeout_s * 1000
    try:
        return integer("deadline_ms", raw, timeout_ms)
    except RequestError:
        raise RequestError(
            f"deadline_ms must be a whole number of milliseconds from 1 to {timeout_ms} (the response timeout), "
            f"got {json.dumps(raw)}"
        ) from None


def _describe_deadline(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    return {"deadline_ms": {"range": [1, spec.batching.response_timeout_s * 1000], "default": spec.deadline.ms}}


def _read_min_members(sent: Mapping[str, Sent], context: ParameterContext) -> int:
    """How many of the requested members must answer: 1 to their count; by default the ensemble's, capped by it."""
    requested = len(read_members(sent, context))
    raw = sent.get("min_members")
    if raw is None:
        return min(context.spec.deadline.min_members, requested)
    return integer("min_members", raw, requested)


def _describe_min_members(spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
    return {"min_members": {"range": [1, len(spec.members)], "default": spec.deadline.min_members}}


@dataclass(frozen=True)
class RequestParameters:
    """Every parameter of one request, read from all its channels and resolved against the ensemble.

    `members` are the positions of the members it asked for (all by default), in declaration order;
    `min_run` is set when the request is a `sequence`; `deadline_ms` when its answer must not wait longer
    (`min_members` of the requested members must have answered by then).
    """

    # parameter() is dataclasses.field(metadata=...) with no default: nothing is shared between instances.
    policy: PolicySpec = parameter(*POLICY_PARAMETERS, read=_read_policy, describe=_describe_policy)  # noqa: RUF009
    members: tuple[int, ...] = parameter("members", read=read_members, describe=_describe_members)
    top_k: int | None = parameter("top_k", read=_read_top_k, describe=_describe_top_k)
    min_run: int | None = parameter("sequence", "min_run", read=_read_min_run, describe=_describe_sequence)
    uncertainty: bool = parameter("uncertainty", read=_read_uncertainty, describe=_describe_uncertainty)
    deadline_ms: int | None = parameter("deadline_ms", read=_read_deadline, describe=_describe_deadline)
    min_members: int = parameter("min_members", read=_read_min_members, describe=_describe_min_members)

    @classmethod
    def resolve(cls, sent: Mapping[str, Sent], context: ParameterContext) -> RequestParameters:
        """Resolve the merged channels' values: every declared field reads its names; the first problem is raised."""
        return cls(**{declared.name: declared.metadata["read"](sent, context) for declared in fields(cls)})

    @classmethod
    def describe(cls, spec: EnsembleSpec) -> dict[str, dict[str, Any]]:
        """Every request parameter this ensemble takes, with its values or range and its default (for describe)."""
        return {name: entry for declared in fields(cls) for name, entry in declared.metadata["describe"](spec).items()}


# Every parameter a request may carry, on any channel, in the order the declarations give them.
REQUEST_PARAMETERS = tuple(name for declared in fields(RequestParameters) for name in declared.metadata["names"])
PARAMETER_HEADERS = {f"x-ensemble-{name.replace('_', '-')}": name for name in REQUEST_PARAMETERS}
# Parameters that are true or false: a JSON body may give them as JSON booleans or as the words other channels carry.
BOOLEAN_PARAMETERS = ("sequence", "early_exit", "uncertainty")


def unknown_parameters(names: Sequence[str]) -> str:
    """The message for parameter names we do not know: each with the closest valid name, then every valid name."""
    closest = [
        f"{name!r} -> {close[0]!r}" for name in names if (close := get_close_matches(name, REQUEST_PARAMETERS, n=1))
    ]
    hint = f" (closest valid: {', '.join(closest)})" if closest else ""
    return f"unknown parameter(s) {sorted(names)}{hint}; valid: {', '.join(REQUEST_PARAMETERS)}"


def channel_parameters(row: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Sent]:
    """The parameters a request carried outside its body, as text: row keys (query on `/invoke`, multipart
    fields, gRPC inputs) and `X-Ensemble-*` headers (`headers` with lowered names), which must agree."""
    from_row: dict[str, Sent] = {name: _text(row[name], name) for name in REQUEST_PARAMETERS if name in row}
    from_headers: dict[str, Sent] = {
        name: headers[header].strip() for header, name in PARAMETER_HEADERS.items() if header in headers
    }
    return merge(from_row, from_headers)


def json_parameters(raw: Any) -> dict[str, Sent]:
    """A JSON body's `parameters` object (ours or v2's), its values typed as sent; Triton's binary-output flags
    are ignored. Booleans are JSON booleans or words, `members` a string or a list of names, the rest strings
    or numbers."""
    if not isinstance(raw, dict):
        raise RequestError("parameters must be an object")
    unknown = sorted(set(raw) - set(REQUEST_PARAMETERS) - set(IGNORED_PARAMETERS))
    if unknown:
        raise RequestError(unknown_parameters(unknown))
    sent: dict[str, Sent] = {}
    for name in REQUEST_PARAMETERS:
        if name not in raw:
            continue
        value = raw[name]
        names_list = name == "members" and isinstance(value, list) and all(isinstance(item, str) for item in value)
        if names_list or (isinstance(value, bool) and name in BOOLEAN_PARAMETERS):
            sent[name] = value
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            wanted = (
                "true or false (a JSON boolean or a string)" if name in BOOLEAN_PARAMETERS else "a string or a number"
            )
            raise RequestError(f"parameters.{name} must be {wanted}, got {json.dumps(value)}")
        else:
            sent[name] = value.strip() if isinstance(value, str) else value
    return sent


def merge(first: Mapping[str, Sent], second: Mapping[str, Sent]) -> dict[str, Sent]:
    """Two channels' parameters; a name both give must have the same value (as text: `true` and JSON true agree)."""
    merged = dict(first)
    for name, value in second.items():
        if name in merged and _canonical(merged[name]) != _canonical(value):
            raise RequestError(
                f"{name} given twice with different values: {_canonical(merged[name])!r} and {_canonical(value)!r}"
            )
        merged[name] = value
    return merged


def integer(name: str, raw: Sent, high: int) -> int:
    """A parameter that must be an integer from 1 to `high` (a JSON integer or its digits), or a RequestError."""
    value = 0
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str):
        try:
            value = int(raw)
        except ValueError:
            value = 0
    if not 1 <= value <= high:
        raise RequestError(f"{name} must be an integer from 1 to {high}, got {raw!r}")
    return value


def boolean(name: str, raw: Sent | None) -> bool:
    """A true-or-false parameter (absent is false), or a RequestError naming the accepted words."""
    return raw is not None and parse_boolean(name, raw, RequestError)


def _canonical(value: Sent) -> str:
    """A value as a text channel would carry it: how values from two channels are compared."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value.strip()
    try:
        return bytes(value).decode("utf-8").strip()
    except (TypeError, UnicodeDecodeError) as e:
        raise RequestError(f"{name}: expected UTF-8 text") from e
