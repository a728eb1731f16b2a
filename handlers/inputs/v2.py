"""Open Inference Protocol v2 (KServe v2, also Triton's HTTP/REST protocol), spoken by the handler itself.

TorchServe routes `POST /v2/models/<name>/infer` to the handler with the body untouched, the same
way it routes `/predictions/<name>`; its own `kservev2` envelope would see only the first request
of a dynamic batch (pytorch/serve issues 2158 and 1302), so the handler reads and writes v2 bodies
itself and batching composes as for every other form. A JSON body whose top level has `inputs` is
a v2 request on any route.

Request: exactly one input tensor. Image ensembles take `BYTES`, shape `[N]`, `data` N base64
strings; tensor ensembles take `FP32`, `FP64` or `FP16`, shape `[N, *shape]`, `data` flat
(row-major) or nested. `parameters` may carry `policy`, `k`, `threshold`; `outputs` may name the
output tensors wanted (answers/v2.py renders them). Errors are `{"error": "<message>"}` with the
status the error carries.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import InvalidImage, PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.parameters import BOOLEAN_PARAMETERS, REQUEST_PARAMETERS, unknown_parameters
from handlers.inputs.tensors import instances_from_values

TENSOR_DATATYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16}
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "data", "parameters")
# Triton's clients ask for binary outputs by default; the answer is JSON data, which they read as well.
IGNORED_PARAMETERS = ("binary_data_output", "binary_data")
BINARY_HEADER = "inference-header-content-length"
# The ranking outputs a request may ask for by name (answers/v2.py renders them), as well as with top_k.
TOP_OUTPUTS = ("top_labels", "top_scores")


@dataclass(frozen=True)
class V2Form:
    """How to answer a v2 request: the id to echo and the outputs it asked for (None: all of them)."""

    id: str
    outputs: tuple[str, ...] | None


@dataclass(frozen=True)
class V2Request:
    """A parsed v2 request: image bytes (image ensembles) or instances [N, *shape], and policy parameters."""

    images: tuple[bytes, ...] | None
    instances: torch.Tensor | None
    policy_params: dict[str, str]
    form: V2Form


class OpenInferenceError(RequestError):
    """A request error found in a v2 body; answered as a v2 error body with the wrapped error's status."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(str(error))
        self.status = error.status
        self.wrapped = error

    @property
    def kind(self) -> str:
        return self.wrapped.kind

    def to_json(self) -> dict[str, object]:
        return {"error": str(self)}


def is_v2(doc: Any) -> bool:
    """A JSON document is a v2 inference request when its top level is an object with `inputs`."""
    return isinstance(doc, dict) and "inputs" in doc


def refuse_binary_extension(headers: Mapping[str, str]) -> None:
    """Triton's binary tensor extension sends raw bytes after the JSON; we read JSON data only."""
    if BINARY_HEADER in headers:
        raise OpenInferenceError(
            UnsupportedMediaType(
                "the binary tensor data extension (Inference-Header-Content-Length) is not supported; "
                "send the input's data as JSON (tritonclient: set_data_from_numpy(..., binary_data=False))"
            )
        )


def read_v2(doc: Mapping[str, Any], *, tensor: TensorSpec | None, limits: Limits, outputs: Sequence[str]) -> V2Request:
    """Validate a v2 request body against the ensemble's input and `outputs` (the output names it has).

    Every problem is an OpenInferenceError naming the field to fix.
    """
    with v2_errors():
        return _read(doc, tensor, limits, outputs)


@contextmanager
def v2_errors() -> Iterator[None]:
    """Inside, a RequestError becomes an OpenInferenceError: a v2 request gets its error as a v2 body."""
    try:
        yield
    except OpenInferenceError:
        raise
    except RequestError as e:
        raise OpenInferenceError(e) from e


def _read(doc: Mapping[str, Any], tensor: TensorSpec | None, limits: Limits, outputs: Sequence[str]) -> V2Request:
    unknown = sorted(set(doc) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"unknown v2 request field(s) {unknown}; valid: {', '.join(REQUEST_KEYS)}")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise RequestError(f"id must be a string, got {type(request_id).__name__}")
    inputs = doc["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise RequestError(f"inputs must be a list of exactly one tensor object, got {count}")
    entry = inputs[0]
    unknown = sorted(set(entry) - set(INPUT_KEYS))
    missing = sorted({"name", "shape", "datatype", "data"} - set(entry))
    if unknown or missing:
        raise RequestError(f"inputs[0]: missing {missing} / unknown {unknown}; an input has {', '.join(INPUT_KEYS)}")
    _check_input_parameters(entry.get("parameters", {}))
    shape = _shape(entry["shape"])
    datatype = entry["datatype"]
    params = read_parameters(doc.get("parameters", {}))
    form = V2Form(id=request_id, outputs=_requested_outputs(doc.get("outputs"), outputs))
    if tensor is None:
        return V2Request(_images(datatype, shape, entry["data"], limits), None, params, form)
    return V2Request(None, _instances(datatype, shape, entry["data"], tensor, limits), params, form)


def _shape(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in raw):
        raise RequestError(f"inputs[0].shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _check_input_parameters(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise RequestError("inputs[0].parameters must be an object")
    if "binary_data_size" in raw:
        raise UnsupportedMediaType(
            "inputs[0] uses the binary tensor data extension (binary_data_size); send its data as JSON"
        )


def read_parameters(raw: Any) -> dict[str, str]:
    """A JSON body's `parameters` object (v2, or our `{"instances": ..., "parameters": ...}`): the policy
    ones as text, as a query string would carry them (`members` may also be a list of names); Triton's
    binary-output flags are ignored."""
    if not isinstance(raw, dict):
        raise RequestError("parameters must be an object")
    unknown = sorted(set(raw) - set(REQUEST_PARAMETERS) - set(IGNORED_PARAMETERS))
    if unknown:
        raise RequestError(unknown_parameters(unknown))
    params = {}
    for key in REQUEST_PARAMETERS:
        if key in raw:
            value = raw[key]
            if key == "members" and isinstance(value, list) and all(isinstance(name, str) for name in value):
                value = ",".join(value)
            if isinstance(value, bool) and key in BOOLEAN_PARAMETERS:
                value = "true" if value else "false"
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                wanted = "true or false (a JSON boolean or a string)" if key in BOOLEAN_PARAMETERS else "a string or a number"
                raise RequestError(f"parameters.{key} must be {wanted}, got {json.dumps(value)}")
            params[key] = str(value).strip()
    return params


def _requested_outputs(raw: Any, valid: Sequence[str]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw):
        raise RequestError('outputs must be a list of objects like {"name": "scores"}')
    for i, output in enumerate(raw):
        unknown = sorted(set(output) - {"name", "parameters"})
        if unknown:
            raise RequestError(f"outputs[{i}]: unknown field(s) {unknown}; an output has name and parameters")
        if output["name"] not in valid:
            raise RequestError(f"outputs[{i}]: unknown output {output['name']!r}; valid: {', '.join(valid)}")
        _ignored_only(output.get("parameters", {}), f"outputs[{i}].parameters")
    return tuple(output["name"] for output in raw)


def _ignored_only(raw: Any, where: str) -> None:
    if not isinstance(raw, dict) or set(raw) - set(IGNORED_PARAMETERS):
        raise RequestError(f"{where}: only {', '.join(IGNORED_PARAMETERS)} may be given (outputs are JSON data)")


def _images(datatype: Any, shape: tuple[int, ...], data: Any, limits: Limits) -> tuple[bytes, ...]:
    if datatype != "BYTES":
        raise UnsupportedMediaType(f"inputs[0].datatype {datatype!r}: this ensemble takes images as BYTES (base64 strings)")
    if len(shape) != 1:
        raise RequestError(f"inputs[0].shape {list(shape)}: images go in a shape [N] tensor of N base64 strings")
    if not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(item, str) for item in data):
        raise RequestError(f"inputs[0].data must be a list of {shape[0]} base64 strings, as shape {list(shape)} says")
    if not data:
        raise RequestError("the request carried no image")
    if len(data) > limits.max_images_per_request:
        raise PayloadTooLarge(f"{len(data)} images in one request; this ensemble accepts at most {limits.max_images_per_request}")
    return tuple(_base64(item, f"inputs[0].data[{i}]") for i, item in enumerate(data))


def _base64(text: str, where: str) -> bytes:
    """Standard base64, optionally behind a `data:image/...;base64,` prefix (the same rule as our JSON form)."""
    encoded = text.split(",", 1)[1] if text.startswith("data:") and ";base64," in text[:64] else text
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"{where}: invalid base64 ({e})") from e


def _instances(datatype: Any, shape: tuple[int, ...], data: Any, spec: TensorSpec, limits: Limits) -> torch.Tensor:
    if datatype not in TENSOR_DATATYPES:
        raise UnsupportedMediaType(
            f"inputs[0].datatype {datatype!r}: this ensemble takes tensors as {', '.join(TENSOR_DATATYPES)}"
        )
    if not isinstance(data, list):
        raise RequestError("inputs[0].data must be a list of numbers, flat (row-major) or nested")
    values = _flatten(data)
    if len(values) != math.prod(shape):
        raise RequestError(f"inputs[0].data holds {len(values)} numbers; shape {list(shape)} needs {math.prod(shape)}")
    return instances_from_values(values, shape, TENSOR_DATATYPES[datatype], spec, limits)


def _flatten(data: Sequence[Any]) -> list[Any]:
    """Nested lists to one row-major list; the shape field, not the nesting, says the tensor's shape."""
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat
