"""Turn one TorchServe request (its parameter dict and headers) into images or tensors, and policy parameters.

TorchServe hands the handler a dict per request: `body` for a plain body, one key per multipart
part, and, on `/models/<name>/invoke` only, one key per query parameter (`/predictions/<name>` drops
the query string before it reaches the worker). Policy parameters therefore come from query
parameters or form fields named `policy`, `k`, `threshold`, or from `X-Ensemble-Policy`,
`X-Ensemble-K`, `X-Ensemble-Threshold` headers, on either path.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from handlers.errors import InvalidImage, PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.manifest import Limits, TensorSpec
from handlers.tensor_inputs import read_json_instances, read_npy

POLICY_KEYS = ("policy", "k", "threshold")
POLICY_HEADERS = {f"x-ensemble-{key}": key for key in POLICY_KEYS}
# Bytes one multipart part may spend on its boundary line and headers beyond those we can account
# for exactly (file name, extra headers). A part dropped for a repeated name shows up as more body
# bytes than the received parts explain; parts smaller than this slack cannot be told from headers.
PART_HEADER_SLACK = 1024
TENSOR_CONTENT_TYPES = ("application/x-npy", "application/json")
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


@dataclass(frozen=True)
class RequestInput:
    """The images of one request, in order, and the policy parameters it asked for."""

    images: tuple[bytes, ...]
    policy_params: Mapping[str, str]


def parse_request(row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits) -> RequestInput:
    """Read one request; raise a RequestError subclass saying exactly what is wrong with it."""
    lowered, content_type = _headers(headers)
    params = _policy_params(row, lowered)
    payload = {key: value for key, value in row.items() if key not in POLICY_KEYS}
    if content_type == "multipart/form-data":
        _check_no_part_dropped(row, lowered)
        images = tuple(_as_bytes(value, f"part {key!r}") for key, value in payload.items())
    else:
        if not _is_raw_image_type(content_type) and content_type != "application/json":
            raise UnsupportedMediaType(
                f"content type {content_type!r}: send an image (image/* or application/octet-stream), "
                "multipart/form-data parts, or application/json instances"
            )
        _refuse_unknown_keys(payload)
        body = payload.get("body", b"")
        if not body:
            raise RequestError("empty request body: send an image, multipart/form-data parts, or JSON instances")
        images = _json_images(body) if content_type == "application/json" else (_as_bytes(body, "body"),)
    if not images:
        raise RequestError("the request carried no image")
    if len(images) > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(images)} images in one request; this ensemble accepts at most {limits.max_images_per_request}"
        )
    return RequestInput(images=images, policy_params=params)


@dataclass(frozen=True)
class TensorRequestInput:
    """The instances of one request to a tensor-input ensemble, [N, *shape], and its policy parameters."""

    instances: torch.Tensor
    policy_params: Mapping[str, str]


def parse_tensor_request(
    row: Mapping[str, Any], headers: Mapping[str, Any], limits: Limits, spec: TensorSpec
) -> TensorRequestInput:
    """Read one request to a tensor-input ensemble: an `application/x-npy` or JSON body."""
    lowered, content_type = _headers(headers)
    params = _policy_params(row, lowered)
    _refuse_unknown_keys({key: value for key, value in row.items() if key not in POLICY_KEYS})
    body = row.get("body", b"")
    if content_type not in TENSOR_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type or 'none'!r}: this ensemble takes tensors as application/x-npy "
            'or application/json {"instances": [[...], ...]}'
        )
    if not body:
        raise RequestError("empty request body: send an application/x-npy array or JSON instances")
    if content_type == "application/json":
        return TensorRequestInput(read_json_instances(body, spec, limits), params)
    return TensorRequestInput(read_npy(_as_bytes(body, "body"), spec, limits), params)


def _headers(headers: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Header names lowered (TorchServe keeps the client's case), and the bare content type."""
    lowered = {key.lower(): value for key, value in headers.items() if isinstance(value, str)}
    return lowered, lowered.get("content-type", "").split(";", 1)[0].strip().lower()


def _refuse_unknown_keys(payload: Mapping[str, Any]) -> None:
    """Outside multipart, the only key besides the policy parameters is the body."""
    unexpected = sorted(set(payload) - {"body"})
    if unexpected:
        raise RequestError(f"unknown query parameter(s) {unexpected}; valid: {', '.join(POLICY_KEYS)}")


def _policy_params(row: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key in POLICY_KEYS:
        if key in row:
            params[key] = _as_text(row[key], key)
    for header, key in POLICY_HEADERS.items():
        if header in headers:
            value = headers[header].strip()
            if key in params and params[key] != value:
                raise RequestError(f"{key} given twice with different values: {params[key]!r} and {value!r}")
            params[key] = value
    return params


def _json_images(body: Any) -> tuple[bytes, ...]:
    """`{"instances": [{"b64": "<base64>"}, ...]}` to image bytes; anything else is a clear 400.

    `body` is raw bytes, or already a JSON value when TorchServe's decode_input_request is on.
    """
    try:
        doc = json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from e
    shape = 'expected {"instances": [{"b64": "<base64 image>"}, ...]}'
    if not isinstance(doc, dict) or set(doc) != {"instances"} or not isinstance(doc["instances"], list):
        raise RequestError(f"wrong JSON shape: {shape}")
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
