"""A request made ready to run: its inputs decoded and its parameters resolved against the ensemble.

The parameters are `members` (which members answer), the policy with `k`, `threshold`, `confidence` and
`early_exit`, `top_k`, `uncertainty`, and `sequence` with `min_run`. Any of them may come as a query
parameter (`/models/<name>/invoke`), an `X-Ensemble-*` header (`_` as `-`), a multipart field, a gRPC
input, or in a JSON body's `parameters`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from handlers.config.policy import (
    DEFAULT_CONFIDENCE,
    UNCERTAINTY_MEASURES,
    VOTE_POLICIES,
    PolicySpec,
    policy_names,
    resolve_policy,
)
from handlers.config.specs import EnsembleSpec, TensorSpec
from handlers.errors import InvalidPolicy, RequestError
from handlers.inputs.images import decode_image
from handlers.inputs.parameters import boolean_parameter, int_parameter, read_sequence
from handlers.inputs.requests import parse_request, parse_tensor_request
from handlers.inputs.v2 import TOP_OUTPUTS, V2Form, v2_errors


@dataclass(frozen=True)
class PreparedRequest:
    """A request whose images decoded (or tensor instances parsed) and whose policy resolved: ready to run.

    `members` are the positions of the members it asked for (all by default), in declaration order.
    `v2` is set when the request was an Open Inference Protocol v2 body, and is answered as one.
    """

    inputs: tuple[Image.Image, ...] | torch.Tensor
    policy: PolicySpec
    members: tuple[int, ...]
    v2: V2Form | None = None
    top_k: int | None = None
    min_run: int | None = None
    uncertainty: bool = False


class RequestPreparer:
    """Turns one request into a PreparedRequest for `spec`, or raises a RequestError naming what is wrong and how to fix it."""

    def __init__(self, spec: EnsembleSpec, outputs: Sequence[str]) -> None:
        """`outputs` are the v2 output names a request may ask for."""
        self.spec = spec
        self.outputs = list(outputs)
        self._names = [member.name for member in spec.members]

    def prepare(self, row: Mapping[str, Any], headers: Mapping[str, Any]) -> PreparedRequest:
        """Parse, validate and decode one request."""
        limits = self.spec.limits
        if isinstance(self.spec.input, TensorSpec):
            tensors = parse_tensor_request(row, headers, limits, self.spec.input, self.outputs)
            with _errors_as(tensors.v2):
                return self._prepared(tensors.instances, tensors.policy_params, tensors.v2)
        request = parse_request(row, headers, limits, self.outputs)
        with _errors_as(request.v2):
            images = tuple(decode_image(data, limits) for data in request.images)
            return self._prepared(images, request.policy_params, request.v2)

    def parameters(self) -> dict[str, dict[str, Any]]:
        """Every request parameter this ensemble takes, with its values or range and its default (for describe)."""
        default = self.spec.policy
        parameters: dict[str, dict[str, Any]] = {
            "policy": {"values": policy_names(), "default": default.name},
            "k": {"range": [1, len(self.spec.members)], "default": default.k, "for": "k_of_n"},
        }
        if self.spec.task != "multiclass":
            parameters["threshold"] = {"range": [0.0, 1.0], "default": default.threshold}
        else:
            parameters["top_k"] = {"range": [1, len(self.spec.labels)], "default": self.spec.top_k}
        parameters["members"] = {"values": self._names, "default": self._names, "format": "comma-separated names"}
        parameters["confidence"] = {"range": [0.0, 1.0], "default": default.confidence or DEFAULT_CONFIDENCE, "for": "cascade"}
        parameters["early_exit"] = {"values": [True, False], "default": default.early_exit, "for": ", ".join(VOTE_POLICIES)}
        parameters["uncertainty"] = {"values": [True, False], "default": False}
        parameters["sequence"] = {"values": [True, False], "default": False}
        parameters["min_run"] = {"range": [1, self.spec.limits.max_images_per_request], "default": 1, "for": "sequence=true"}
        return parameters

    def _prepared(self, inputs: tuple[Image.Image, ...] | torch.Tensor, params: Mapping[str, str], v2: V2Form | None) -> PreparedRequest:
        """The request's parameters resolved: its members and policy, and the `top_k` and `sequence` parts of its answer."""
        rest = dict(params)
        members = self._members(rest.pop("members", None), v2)
        top_k = self._top_k(rest.pop("top_k", None), v2)
        min_run = read_sequence(rest.pop("sequence", None), rest.pop("min_run", None), self.spec.limits.max_images_per_request)
        if min_run is not None and v2 is not None:
            raise RequestError("sequence is for our JSON answer; read a v2 answer's label outputs frame by frame")
        uncertainty = boolean_parameter("uncertainty", rest.pop("uncertainty", None))
        if v2 is not None and not set(v2.outputs or ()).isdisjoint(UNCERTAINTY_MEASURES):
            uncertainty = True
        return PreparedRequest(inputs, self._policy(rest, members), members, v2, top_k, min_run, uncertainty)

    def _members(self, raw: str | None, v2: V2Form | None) -> tuple[int, ...]:
        """The positions of the members a request named in `members=a,b` (all without it), in declaration order."""
        names = self._names
        if raw is None:
            return tuple(range(len(names)))
        asked = [name.strip() for name in raw.split(",")]
        valid = ", ".join(names)
        if not all(asked):
            raise RequestError(f"members must be member names separated by commas, like members={names[0]}; valid: {valid}")
        unknown = [name for name in asked if name not in names]
        if unknown:
            raise RequestError(f"unknown member(s) {unknown}; valid members: {valid}")
        twice = sorted({name for name in asked if asked.count(name) > 1})
        if twice:
            raise RequestError(f"member(s) {twice} named twice in members; name each once")
        positions = tuple(sorted(names.index(name) for name in asked))
        left_out = {f"{name}." for i, name in enumerate(names) if i not in positions}
        dropped = [output for output in (v2.outputs or ()) if output.startswith(tuple(left_out))] if v2 is not None else []
        if dropped:
            raise RequestError(f"outputs {dropped} belong to members this request leaves out (members={','.join(asked)})")
        return positions

    def _top_k(self, raw: str | None, v2: V2Form | None) -> int | None:
        """The `top_k` a request asked for, validated (multiclass only, 1 to the number of labels), else the ensemble's default.

        A v2 answer carries the ranking (`top_labels`, `top_scores`) only when the request names
        top_k or asks for those outputs.
        """
        if raw is None:
            asks = v2 is None or any(output in TOP_OUTPUTS for output in v2.outputs or ())
            return self.spec.top_k if asks else None
        if self.spec.task != "multiclass":
            raise RequestError(f"top_k applies to multiclass ensembles; this one is {self.spec.task}")
        return int_parameter("top_k", raw, len(self.spec.labels))

    def _policy(self, params: Mapping[str, str], members: Sequence[int]) -> PolicySpec:
        """The request's policy; `k` counts the members it asked for."""
        try:
            return resolve_policy(params, default=self.spec.policy, task=self.spec.task, n_members=len(members))
        except InvalidPolicy as e:
            if len(members) == len(self.spec.members):
                raise
            asked = ",".join(self._names[m] for m in members)
            raise InvalidPolicy(f"{e} (k counts the {len(members)} member(s) this request asked for: members={asked})") from e


def _errors_as(v2: V2Form | None) -> AbstractContextManager[None]:
    """A v2 request's later errors (an image that does not decode, a bad policy) get v2 error bodies too."""
    return v2_errors() if v2 is not None else nullcontext()
