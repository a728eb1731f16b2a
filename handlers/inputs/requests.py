"""Read one TorchServe request (its row and headers) off the wire: its images or tensors, and its parameters.

TorchServe hands the handler a dict per request: `body` for a plain REST body, one key per multipart
part, one key per gRPC input (TorchServe's examples name it `data`), and, on `/models/<name>/invoke`
only, one key per query parameter (`/predictions/<name>` drops the query string before it reaches
the worker). Request parameters therefore come from row keys, `X-Ensemble-*` headers and a JSON body's
`parameters` (`inputs.parameters` reads and merges them). A JSON body is our `{"instances": ...}` form
(KServe v1's; `ImageInstances`) or, when it has `inputs`, an Open Inference Protocol v2 request
(`handlers.inputs.v2`). gRPC carries no content type: a body starting with `{` is JSON, one starting
with the `.npy` magic is an array. Each form ends in one `WireRequest`, which `inputs.prepare` decodes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.images import decode_base64
from handlers.inputs.parameters import (
    REQUEST_PARAMETERS,
    Sent,
    channel_parameters,
    json_parameters,
    merge,
    unknown_parameters,
)
from handlers.inputs.tensors import NPY_MAGIC, read_json_instances, read_npy
from handlers.inputs.v2 import V2Form, is_v2, read_v2, refuse_binary_extension, v2_errors

BODY_KEYS = ("body", "data")
# Bytes one multipart part may spend on its boundary line and headers beyond those we can account
# for exactly (file name, extra headers). A part dropped for a repeated name shows up as more body
# bytes than the received parts explain; parts smaller than this slack cannot be told from headers.
PART_HEADER_SLACK = 1024
TENSOR_CONTENT_TYPES = ("application/x-npy", "application/json")
# The most bytes a multipart part may hold and still be read as a misspelt parameter's value, not an image.
PARAMETER_TEXT_LIMIT = 256
IMAGES_SHAPE = 'expected {"instances": [{"b64": "<base64 image>"}, ...]}'


class Base64Image(BaseModel):
    """One image of our JSON form: `{"b64": "<base64>"}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    b64: str


class ImageInstances(BaseModel):
    """Our JSON form for images, which is also KServe v1's:
    `{"instances": [{"b64": ...}, ...], "parameters": {...}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    instances: tuple[Base64Image, ...]
    parameters: Any = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, raw: Any) -> Any:
        if (
            not isinstance(raw, dict)
            or set(raw) - {"parameters"} != {"instances"}
            or not isinstance(raw["instances"], list)
        ):
            raise RequestError(f'wrong JSON shape: {IMAGES_SHAPE} or a v2 request {{"inputs": [...]}}')
        for i, instance in enumerate(raw["instances"]):
            if not isinstance(instance, dict) or set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise RequestError(f"instances[{i}]: {IMAGES_SHAPE}")
        return raw


@dataclass(frozen=True)
class WireRequest:
    """One request as read off the wire: its images' bytes (image ensembles) or instances [N, *shape] (tensor
    ensembles), the parameters all its channels carried, merged, and its v2 form if it was a v2 request."""

    inputs: tuple[bytes, ...] | torch.Tensor
    parameters: Mapping[str, Sent]
    v2: V2Form | None = None


def read_request(
    row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, outputs: Sequence[str]
) -> WireRequest:
    """Read one request to an image ensemble; raise a RequestError subclass saying exactly what is wrong with it.

    `outputs` are the ensemble's v2 output names, which a v2 request may choose from.
    """
    lowered, content_type = _headers(headers)
    params = channel_parameters(row, lowered)
    payload = {key: value for key, value in row.items() if key not in REQUEST_PARAMETERS}
    if content_type == "multipart/form-data":
        _check_no_part_dropped(row, lowered)
        _refuse_misspelt_parameters(payload)
        images = tuple(_as_bytes(value, f"part {key!r}") for key, value in payload.items())
    else:
        refuse_binary_extension(lowered)
        if not _is_raw_image_type(content_type) and content_type != "application/json":
            raise UnsupportedMediaType(
                f"content type {content_type!r}: send an image (image/* or application/octet-stream), "
                "multipart/form-data parts, application/json instances or a v2 request"
            )
        body = _body(payload, "an image, multipart/form-data parts, JSON instances or a v2 request")
        if content_type == "application/json" or (not content_type and _looks_like_json(body)):
            doc = _json_document(body)
            if is_v2(doc):
                with v2_errors():
                    request = read_v2(doc, tensor=None, limits=limits, outputs=outputs)
                    assert request.images is not None, "an image ensemble's v2 request carries images"
                    return WireRequest(request.images, merge(params, request.parameters), request.form)
            instances = ImageInstances.model_validate(doc)
            if "parameters" in instances.model_fields_set:
                params = merge(params, json_parameters(instances.parameters))
            images = tuple(decode_base64(item.b64, f"instances[{i}].b64") for i, item in enumerate(instances.instances))
        else:
            images = (_as_bytes(body, "body"),)
    if not images:
        raise RequestError("the request carried no image")
    if len(images) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(images)} images in one request; this ensemble accepts at most {limits.max_images_per_request}"
        )
    return WireRequest(images, params)


def read_tensor_request(
    row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, spec: TensorSpec, outputs: Sequence[str]
) -> WireRequest:
    """Read one request to a tensor-input ensemble: an `application/x-npy` body, JSON instances or a v2 request."""
    lowered, content_type = _headers(headers)
    params = channel_parameters(row, lowered)
    refuse_binary_extension(lowered)
    payload = {key: value for key, value in row.items() if key not in REQUEST_PARAMETERS}
    body = _body(payload, "an application/x-npy array, JSON instances or a v2 request")
    if not content_type:
        npy = _as_bytes(body, "body").startswith(NPY_MAGIC)
        content_type = "application/json" if _looks_like_json(body) else "application/x-npy" if npy else ""
    if content_type not in TENSOR_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type or 'none'!r}: this ensemble takes tensors as application/x-npy, "
            'application/json {"instances": [[...], ...]} or a v2 request'
        )
    if content_type == "application/x-npy":
        return WireRequest(read_npy(_as_bytes(body, "body"), spec, limits), params)
    doc = _json_document(body)
    if is_v2(doc):
        with v2_errors():
            request = read_v2(doc, tensor=spec, limits=limits, outputs=outputs)
            assert request.instances is not None, "a tensor ensemble's v2 request carries instances"
            return WireRequest(request.instances, merge(params, request.parameters), request.form)
    if isinstance(doc, dict) and "parameters" in doc:
        params = merge(params, json_parameters(doc["parameters"]))
        doc = {key: value for key, value in doc.items() if key != "parameters"}
    return WireRequest(read_json_instances(doc, spec, limits), params)


def _headers(headers: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Header names lowered (TorchServe keeps the client's case), and the bare content type."""
    lowered = {key.lower(): value for key, value in headers.items() if isinstance(value, str)}
    return lowered, lowered.get("content-type", "").split(";", 1)[0].strip().lower()


def _body(payload: Mapping[str, Any], wanted: str) -> Any:
    """Outside multipart, the only key besides the policy parameters is the body (`body`, or `data` over gRPC)."""
    unexpected = sorted(set(payload) - set(BODY_KEYS))
    if unexpected:
        raise RequestError(
            f"{unknown_parameters(unexpected)}, and the body (over gRPC an input named {' or '.join(BODY_KEYS)})"
        )
    if len(payload) > 1:
        raise RequestError(f"both {' and '.join(BODY_KEYS)} given; send the body once")
    body = next(iter(payload.values()), b"")
    if not body:
        raise RequestError(f"empty request body: send {wanted}")
    return body


def _looks_like_json(body: Any) -> bool:
    """A body without a content type (gRPC) is JSON when it is an object; no image or .npy starts with `{`."""
    if isinstance(body, (dict, list)):
        return True
    head = body[:64].lstrip() if isinstance(body, (bytes, bytearray, str)) else b""
    return head[:1] in (b"{", "{")


def _json_document(body: Any) -> Any:
    """`body` parsed as JSON; it is already a JSON value when TorchServe's decode_input_request is on."""
    try:
        return json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from e


def _is_raw_image_type(content_type: str) -> bool:
    """A body that is itself one image: image/*, octet-stream, or no type (the image's bytes tell its format)."""
    return content_type in ("", "application/octet-stream") or content_type.startswith("image/")


def _refuse_misspelt_parameters(parts: Mapping[str, Any]) -> None:
    """A multipart part holding a few bytes of text is a parameter we do not know, not an image.

    On `/models/<name>/invoke` TorchServe puts query parameters and form parts in one dict, so
    `?polcy=any` arrives as a part named `polcy`. No accepted image format is text, and no image fits
    in PARAMETER_TEXT_LIMIT bytes of it, so such parts are named as unknown parameters, with the
    closest valid name, instead of being decoded as images.
    """
    texts = {key: len(value) for key, value in parts.items() if _is_short_text(value)}
    if texts:
        sizes = ", ".join(f"{key!r} holds {size} bytes of text" for key, size in texts.items())
        raise RequestError(f"{unknown_parameters(list(texts))}; an image part must hold an image's bytes ({sizes})")


def _is_short_text(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return False
    return isinstance(value, str) and 0 < len(value.strip()) <= PARAMETER_TEXT_LIMIT and value.strip().isprintable()


def _check_no_part_dropped(row: Mapping[str, Any], headers: Mapping[str, str]) -> None:
    """Refuse a multipart body whose size the received parts do not explain: a repeated part name.

    TorchServe keeps only the last value of a repeated part name; the handler cannot see the lost
    parts, only that Content-Length is larger than the parts it did receive.
    """
    declared = headers.get("content-length")
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return
    boundary = re.search(r'boundary="?([^";]+)"?', headers.get("content-type", ""))
    delimiter = len(boundary.group(1)) + 4 if boundary else 0
    received = sum(len(v) if isinstance(v, (bytes, bytearray, str)) else 0 for v in row.values())
    overhead = (len(row) + 1) * (delimiter + PART_HEADER_SLACK)
    if int(declared) > received + overhead:
        raise RequestError(
            "multipart body is larger than its parts: part names must be distinct, because TorchServe "
            "keeps only the last part of a repeated name and the others would be silently dropped"
        )


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise UnsupportedMediaType(f"{what}: expected image bytes, got {type(value).__name__}")
