"""A request made ready to run: read off the wire, its inputs decoded and its parameters resolved, in one pass.

wire format (`inputs.requests`, `inputs.v2`) -> `WireRequest` -> decoded inputs and `RequestParameters`
(`inputs.parameters`) -> `PreparedRequest`. Any of the parameters may come as a query parameter
(`/models/<name>/invoke`), an `X-Ensemble-*` header (`_` as `-`), a multipart field, a gRPC input,
or in a JSON body's `parameters`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from handlers.config.policy import PolicySpec
from handlers.config.specs import EnsembleSpec, TensorSpec
from handlers.inputs.images import decode_image
from handlers.inputs.parameters import ParameterContext, RequestParameters
from handlers.inputs.requests import read_request, read_tensor_request
from handlers.inputs.v2 import V2Form, v2_errors

# The header a proxy in front stamps with when it received a request (our gateway does): deadlines count from it.
ARRIVAL_HEADER = "x-request-start"


@dataclass(frozen=True)
class PreparedRequest:
    """A request whose images decoded (or tensor instances parsed) and whose parameters resolved: ready to run.

    `v2` is set when the request was an Open Inference Protocol v2 body, and is answered as one; `defaults_only`
    when no parameter reached it on any channel (its answer says so: a query string TorchServe dropped is unseen).
    `arrived` (`time.monotonic()` seconds) is when a proxy in front received it, from its `X-Request-Start` stamp.
    """

    inputs: tuple[Image.Image, ...] | torch.Tensor
    parameters: RequestParameters
    v2: V2Form | None = None
    defaults_only: bool = False
    arrived: float | None = None

    @property
    def policy(self) -> PolicySpec:
        return self.parameters.policy

    @property
    def members(self) -> tuple[int, ...]:
        """The positions of the members it asked for (all by default), in declaration order."""
        return self.parameters.members

    @property
    def top_k(self) -> int | None:
        return self.parameters.top_k

    @property
    def min_run(self) -> int | None:
        return self.parameters.min_run

    @property
    def uncertainty(self) -> bool:
        return self.parameters.uncertainty

    @property
    def deadline_ms(self) -> int | None:
        return self.parameters.deadline_ms

    @property
    def min_members(self) -> int:
        return self.parameters.min_members


class RequestPreparer:
    """Turns one request into a PreparedRequest for `spec`, or raises a RequestError naming what is wrong and how to
    fix it."""

    def __init__(self, spec: EnsembleSpec, outputs: Sequence[str]) -> None:
        """`outputs` are the v2 output names a request may ask for."""
        self.spec = spec
        self.outputs = list(outputs)

    def prepare(self, row: Mapping[str, Any], headers: Mapping[str, Any]) -> PreparedRequest:
        """Read, validate and decode one request."""
        limits = self.spec.limits
        if isinstance(self.spec.input, TensorSpec):
            request = read_tensor_request(row, headers, limits, self.spec.input, self.outputs)
        else:
            request = read_request(row, headers, limits, self.outputs)
        with _errors_as(request.v2):
            sent = request.inputs
            inputs = sent if isinstance(sent, torch.Tensor) else tuple(decode_image(data, limits) for data in sent)
            context = ParameterContext(self.spec, request.v2.outputs if request.v2 else None, request.v2 is not None)
            parameters = RequestParameters.resolve(request.parameters, context)
            stamp = next((v for k, v in headers.items() if k.lower() == ARRIVAL_HEADER and isinstance(v, str)), None)
            arrived = arrival(stamp, self.spec.batching.response_timeout_s)
            return PreparedRequest(
                inputs, parameters, request.v2, defaults_only=not request.parameters, arrived=arrived
            )

    def parameters(self) -> dict[str, dict[str, Any]]:
        """Every request parameter this ensemble takes, with its values or range and its default (for describe)."""
        return RequestParameters.describe(self.spec)


def arrival(stamp: str | None, limit_s: float) -> float | None:
    """When a proxy received the request, as `time.monotonic()` seconds, from its `X-Request-Start` stamp: `t=` and
    seconds, milliseconds or microseconds since the epoch (nginx's `${msec}`, Heroku's, New Relic's), told apart by
    size. None without a stamp, or with one that does not read as a time within `limit_s` before now (a stamp from
    the future is now): a deadline then counts from when the worker took the request up."""
    if stamp is None:
        return None
    text = stamp.strip().removeprefix("t=")
    try:
        value = float(text)
    except ValueError:
        return None
    seconds = value / 1e6 if value > 1e14 else value / 1e3 if value > 1e11 else value
    waited = time.time() - seconds
    if not math.isfinite(waited) or waited > limit_s:
        return None
    return time.monotonic() - max(0.0, waited)


def _errors_as(v2: V2Form | None) -> AbstractContextManager[None]:
    """A v2 request's later errors (an image that does not decode, a bad policy) get v2 error bodies too."""
    return v2_errors() if v2 is not None else nullcontext()
