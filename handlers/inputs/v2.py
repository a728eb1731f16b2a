"""Open Inference Protocol v2 (KServe v2, also Triton's HTTP/REST protocol), spoken by the handler itself.

TorchServe routes `POST /v2/models/<name>/infer` to the handler with the body untouched, the same
way it routes `/predictions/<name>`; its own `kservev2` envelope would see only the first request
of a dynamic batch (pytorch/serve issues 2158 and 1302), so the handler reads and writes v2 bodies
itself and batching composes as for every other form. A JSON body whose top level has `inputs` is
a v2 request on any route.

Request: exactly one input tensor. Image ensembles take `BYTES`, shape `[N]`, `data` N base64
strings; tensor ensembles take `FP32`, `FP64` or `FP16`, shape `[N, *shape]`, `data` flat
(row-major) or nested. `parameters` may carry every request parameter; `outputs` may name the
output tensors wanted (answers/v2.py renders them). Errors are `{"error": "<message>"}` with the
status the error carries. The body is read into pydantic models (`InferenceRequest`, as KServe's own v2 data
models do) whose validators give the same messages as every other form.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.images import decode_base64
from handlers.inputs.parameters import IGNORED_PARAMETERS, Sent, json_parameters
from handlers.inputs.tensors import instances_from_values

TENSOR_DATATYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16}
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "data", "parameters")
BINARY_HEADER = "inference-header-content-length"
ONLY_IGNORED = f"only {', '.join(IGNORED_PARAMETERS)} may be given (outputs are JSON data)"


class RequestedOutput(BaseModel):
    """One entry of a v2 request's `outputs`: an output's name (binary-output flags are ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    parameters: dict[str, Any] = {}


class InputTensor(BaseModel):
    """A v2 request's input tensor as sent; its shape and data are checked against each other when read."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Any
    shape: tuple[int, ...]
    datatype: Any
    data: Any
    parameters: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, raw: Any) -> Any:
        unknown = sorted(set(raw) - set(INPUT_KEYS))
        missing = sorted({"name", "shape", "datatype", "data"} - set(raw))
        if unknown or missing:
            raise RequestError(
                f"inputs[0]: missing {missing} / unknown {unknown}; an input has {', '.join(INPUT_KEYS)}"
            )
        parameters = raw.get("parameters", {})
        if not isinstance(parameters, dict):
            raise RequestError("inputs[0].parameters must be an object")
        if "binary_data_size" in parameters:
            raise UnsupportedMediaType(
                "inputs[0] uses the binary tensor data extension (binary_data_size); send its data as JSON"
            )
        shape = raw["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise RequestError(f"inputs[0].shape must be a list of non-negative integers, got {shape!r}")
        return raw


class InferenceRequest(BaseModel):
    """An Open Inference Protocol v2 inference request, as KServe's v2 data models describe it: one input here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = ""
    parameters: Any = {}
    inputs: tuple[InputTensor]
    outputs: tuple[RequestedOutput, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, raw: Any) -> Any:
        unknown = sorted(set(raw) - set(REQUEST_KEYS))
        if unknown:
            raise RequestError(f"unknown v2 request field(s) {unknown}; valid: {', '.join(REQUEST_KEYS)}")
        request_id = raw.get("id", "")
        if not isinstance(request_id, str):
            raise RequestError(f"id must be a string, got {type(request_id).__name__}")
        inputs = raw["inputs"]
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            count = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
            raise RequestError(f"inputs must be a list of exactly one tensor object, got {count}")
        outputs = raw.get("outputs")
        if outputs is not None and (
            not isinstance(outputs, list)
            or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
        ):
            raise RequestError('outputs must be a list of objects like {"name": "scores"}')
        for i, output in enumerate(outputs or ()):
            unknown = sorted(set(output) - {"name", "parameters"})
            if unknown:
                raise RequestError(f"outputs[{i}]: unknown field(s) {unknown}; an output has name and parameters")
            if not isinstance(output.get("parameters", {}), dict):
                raise RequestError(f"outputs[{i}].parameters: {ONLY_IGNORED}")
        return raw


@dataclass(frozen=True)
class V2Form:
    """How to answer a v2 request: the id to echo and the outputs it asked for (None: all of them)."""

    id: str
    outputs: tuple[str, ...] | None


@dataclass(frozen=True)
class V2Request:
    """A read v2 request: image bytes (image ensembles) or instances [N, *shape], its parameters and its form."""

    images: tuple[bytes, ...] | None
    instances: torch.Tensor | None
    parameters: dict[str, Sent]
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
        try:
            request = InferenceRequest.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise RequestError(f"{where}: {first['msg']}") from e
        entry = request.inputs[0]
        parameters = json_parameters(request.parameters)
        form = V2Form(id=request.id, outputs=_requested_outputs(request.outputs, outputs))
        if tensor is None:
            return V2Request(_images(entry, limits), None, parameters, form)
        return V2Request(None, _instances(entry, tensor, limits), parameters, form)


@contextmanager
def v2_errors() -> Iterator[None]:
    """Inside, a RequestError becomes an OpenInferenceError: a v2 request gets its error as a v2 body."""
    try:
        yield
    except OpenInferenceError:
        raise
    except RequestError as e:
        raise OpenInferenceError(e) from e


def _requested_outputs(raw: tuple[RequestedOutput, ...] | None, valid: Sequence[str]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    for i, output in enumerate(raw):
        if output.name not in valid:
            raise RequestError(f"outputs[{i}]: unknown output {output.name!r}; valid: {', '.join(valid)}")
        if set(output.parameters) - set(IGNORED_PARAMETERS):
            raise RequestError(f"outputs[{i}].parameters: {ONLY_IGNORED}")
    return tuple(output.name for output in raw)


def _images(entry: InputTensor, limits: Limits) -> tuple[bytes, ...]:
    shape, data = entry.shape, entry.data
    if entry.datatype != "BYTES":
        raise UnsupportedMediaType(
            f"inputs[0].datatype {entry.datatype!r}: this ensemble takes images as BYTES (base64 strings)"
        )
    if len(shape) != 1:
        raise RequestError(f"inputs[0].shape {list(shape)}: images go in a shape [N] tensor of N base64 strings")
    if not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(item, str) for item in data):
        raise RequestError(f"inputs[0].data must be a list of {shape[0]} base64 strings, as shape {list(shape)} says")
    if not data:
        raise RequestError("the request carried no image")
    if len(data) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(data)} images in one request; this ensemble accepts at most {limits.max_images_per_request}"
        )
    return tuple(decode_base64(item, f"inputs[0].data[{i}]") for i, item in enumerate(data))


def _instances(entry: InputTensor, spec: TensorSpec, limits: Limits) -> torch.Tensor:
    shape, data = entry.shape, entry.data
    if entry.datatype not in TENSOR_DATATYPES:
        raise UnsupportedMediaType(
            f"inputs[0].datatype {entry.datatype!r}: this ensemble takes tensors as {', '.join(TENSOR_DATATYPES)}"
        )
    if not isinstance(data, list):
        raise RequestError("inputs[0].data must be a list of numbers, flat (row-major) or nested")
    values = _flatten(data)
    if len(values) != math.prod(shape):
        raise RequestError(f"inputs[0].data holds {len(values)} numbers; shape {list(shape)} needs {math.prod(shape)}")
    return instances_from_values(values, shape, TENSOR_DATATYPES[entry.datatype], spec, limits)


def _flatten(data: Sequence[Any]) -> list[Any]:
    """Nested lists to one row-major list; the shape field, not the nesting, says the tensor's shape."""
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat
