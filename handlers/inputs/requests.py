"""Turn one TorchServe request (its parameter dict and headers) into images or tensors, and policy parameters.

TorchServe hands the handler a dict per request: `body` for a plain REST body, one key per multipart
part, one key per gRPC input (TorchServe's examples name it `data`), and, on `/models/<name>/invoke`
only, one key per query parameter (`/predictions/<name>` drops the query string before it reaches
the worker). Policy parameters therefore come from query parameters, form fields or gRPC inputs
named `policy`, `k`, `threshold`, from `X-Ensemble-Policy`, `X-Ensemble-K`, `X-Ensemble-Threshold`
headers, or from a JSON body's `parameters` object (our form's or a v2 request's). A JSON body is
our `{"instances": ...}` form or, when it has `inputs`, an Open Inference Protocol v2 request
(`handlers.inputs.v2`). gRPC carries no content type: a body starting with `{` is JSON, one
starting with the `.npy` magic is an array.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import InvalidImage, PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.parameters import REQUEST_PARAMETERS, unknown_parameters
from handlers.inputs.tensors import NPY_MAGIC, read_json_instances, read_npy
from handlers.inputs.v2 import V2Form, is_v2, read_parameters, read_v2, refuse_binary_extension, v2_errors

PARAMETER_HEADERS = {f"x-ensemble-{key.replace('_', '-')}": key for key in REQUEST_PARAMETERS}
BODY_KEYS = ("body", "data")
# Bytes one multipart part may spend on its boundary line and headers beyond those we can account
# for exactly (file name, extra headers). A part dropped for a repeated name shows up as more body
# bytes than the received parts explain; parts smaller than this slack cannot be told from headers.
PART_HEADER_SLACK = 1024
TENSOR_CONTENT_TYPES = ("application/x-npy", "application/json")
# The most bytes a multipart part may hold and still be read as a misspelt parameter's value, not an image.
PARAMETER_TEXT_LIMIT = 256
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


@dataclass(frozen=True)
class RequestInput:
    """The images of one request, in order, the policy parameters it asked for, and its v2 form if it was one."""

    images: tuple[bytes, ...]
    policy_params: Mapping[str, str]
    v2: V2Form | None = None


def parse_request(row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, outputs: Sequence[str]) -> RequestInput:
    """Read one request; raise a RequestError subclass saying exactly what is wrong with it.

    `outputs` are the ensemble's v2 output names, which a v2 request may choose from.
    """
    lowered, content_type = _headers(headers)
    params = _policy_params(row, lowered)
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
                    return RequestInput(request.images, _merged(params, request.policy_params), request.form)
            doc, body_params = _split_parameters(doc)
            params = _merged(params, body_params)
            images = _json_images(doc)
        else:
            images = (_as_bytes(body, "body"),)
    if not images:
        raise RequestError("the request carried no image")
    if len(images) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(images)} images in one request; this ensemble accepts at most {limits.max_images_per_request}"
        )
    return RequestInput(images=images, policy_params=params)


@dataclass(frozen=True)
class TensorRequestInput:
    """The instances of one request to a tensor-input ensemble, [N, *shape], its policy parameters and v2 form."""

    instances: torch.Tensor
    policy_params: Mapping[str, str]
    v2: V2Form | None = None


def parse_tensor_request(
    row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, spec: TensorSpec, outputs: Sequence[str]
) -> TensorRequestInput:
    """Read one request to a tensor-input ensemble: an `application/x-npy` body, JSON instances or a v2 request."""
    lowered, content_type = _headers(headers)
    params = _policy_params(row, lowered)
    refuse_binary_extension(lowered)
    body = _body({key: value for key, value in row.items() if key not in REQUEST_PARAMETERS}, "an application/x-npy array, JSON instances or a v2 request")
    if not content_type:
        content_type = "application/json" if _looks_like_json(body) else "application/x-npy" if _as_bytes(body, "body").startswith(NPY_MAGIC) else ""
    if content_type not in TENSOR_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type or 'none'!r}: this ensemble takes tensors as application/x-npy, "
            'application/json {"instances": [[...], ...]} or a v2 request'
        )
    if content_type == "application/x-npy":
        return TensorRequestInput(read_npy(_as_bytes(body, "body"), spec, limits), params)
    doc = _json_document(body)
    if is_v2(doc):
        with v2_errors():
            request = read_v2(doc, tensor=spec, limits=limits, outputs=outputs)
            assert request.instances is not None, "a tensor ensemble's v2 request carries instances"
            return TensorRequestInput(request.instances, _merged(params, request.policy_params), request.form)
    doc, body_params = _split_parameters(doc)
    return TensorRequestInput(read_json_instances(doc, spec, limits), _merged(params, body_params))


def _headers(headers: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Header names lowered (TorchServe keeps the client's case), and the bare content type."""
    lowered = {key.lower(): value for key, value in headers.items() if isinstance(value, str)}
    return lowered, lowered.get("content-type", "").split(";", 1)[0].strip().lower()


def _body(payload: Mapping[str, Any], wanted: str) -> Any:
    """Outside multipart, the only key besides the policy parameters is the body (`body`, or `data` over gRPC)."""
    unexpected = sorted(set(payload) - set(BODY_KEYS))
    if unexpected:
        raise RequestError(f"{unknown_parameters(unexpected)}, and the body (over gRPC an input named {' or '.join(BODY_KEYS)})")
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


def _split_parameters(doc: Any) -> tuple[Any, dict[str, str]]:
    """Our JSON form without its optional `parameters` object, and the policy parameters that object carries."""
    if not isinstance(doc, dict) or "parameters" not in doc:
        return doc, {}
    rest = {key: value for key, value in doc.items() if key != "parameters"}
    return rest, read_parameters(doc["parameters"])


def _merged(params: Mapping[str, str], body_params: Mapping[str, str]) -> dict[str, str]:
    """Policy parameters from the channel (query, fields, headers) and from the body, which must agree."""
    merged = dict(params)
    for key, value in body_params.items():
        if key in merged and merged[key] != value:
            raise RequestError(f"{key} given twice with different values: {merged[key]!r} and {value!r}")
        merged[key] = value
    return merged


def _policy_params(row: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key in REQUEST_PARAMETERS:
        if key in row:
            params[key] = _as_text(row[key], key)
    return _merged(params, {key: headers[header].strip() for header, key in PARAMETER_HEADERS.items() if header in headers})


def _json_images(doc: Any) -> tuple[bytes, ...]:
    """`{"instances": [{"b64": "<base64>"}, ...]}` to image bytes; anything else is a clear 400."""
    shape = 'expected {"instances": [{"b64": "<base64 image>"}, ...]}'
    if not isinstance(doc, dict) or set(doc) != {"instances"} or not isinstance(doc["instances"], list):
        raise RequestError(f'wrong JSON shape: {shape} or a v2 request {{"inputs": [...]}}')
    images = []
    for i, instance in enumerate(doc["instances"]):
        if not isinstance(instance, dict) or set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise RequestError(f"instances[{i}]: {shape}")
        encoded = _DATA_URI.sub("", instance["b64"], count=1)
        try:
            images.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as e:
            raise InvalidImage(f"instances[{i}].b64: invalid base64 ({e})") from e
    return tuple(images)


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
    if declared is None or not declared.isdigit():
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


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value.strip()
    try:
        return bytes(value).decode("utf-8").strip()
    except (TypeError, UnicodeDecodeError) as e:
        raise RequestError(f"{what}: expected UTF-8 text") from e
