"""Reading one TorchServe request: body kinds, policy parameter sources, and every refusal."""

from __future__ import annotations

import base64
import json

import pytest

from handlers.config.specs import Limits
from handlers.errors import InvalidImage, PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.images import decode_image
from handlers.inputs.requests import WireRequest, read_request

A, B, C = b"A" * 3000, b"B" * 5000, b"C" * 4000
BOUNDARY = "----b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_length(parts: dict[str, bytes]) -> str:
    """Content-Length of a multipart body carrying `parts`, laid out as curl does."""
    size = 0
    for name, data in parts.items():
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        size += len(head) + len(data) + 2
    return str(size + len(f"--{BOUNDARY}--\r\n"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("row", "headers", "expected"),
    [
        pytest.param({"body": A}, {"Content-Type": "image/png"}, WireRequest((A,), {}), id="raw"),
        pytest.param({"body": bytearray(A)}, {}, WireRequest((A,), {}), id="raw-no-content-type"),
        pytest.param(
            {"policy": b"k_of_n", "k": b"2", "body": A},
            {"Content-Type": "application/octet-stream"},
            WireRequest((A,), {"policy": "k_of_n", "k": "2"}),
            id="raw-invoke-query",
        ),
        pytest.param(
            {"body": A},
            {"X-Ensemble-Policy": "any", "x-ensemble-threshold": " 0.3 "},
            WireRequest((A,), {"policy": "any", "threshold": "0.3"}),
            id="raw-headers",
        ),
        pytest.param(
            {"first": A, "second": B, "third": C},
            {"Content-Type": MULTIPART, "Content-Length": multipart_length({"first": A, "second": B, "third": C})},
            WireRequest((A, B, C), {}),
            id="multipart-in-part-order",
        ),
        pytest.param(
            {"policy": b"all", "img": B},
            {"Content-Type": MULTIPART, "Content-Length": multipart_length({"policy": b"all", "img": B})},
            WireRequest((B,), {"policy": "all"}),
            id="multipart-policy-field",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}, {"b64": "data:image/png;base64," + b64(B)}]}).encode()},
            {"Content-Type": "application/json; charset=utf-8"},
            WireRequest((A, B), {}),
            id="json-instances",
        ),
        pytest.param(
            {"body": {"instances": [{"b64": b64(C)}]}},
            {"Content-Type": "application/json"},
            WireRequest((C,), {}),
            id="json-already-decoded",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}], "parameters": {"policy": "k_of_n", "k": 2}}).encode()},
            {"Content-Type": "application/json"},
            WireRequest((A,), {"policy": "k_of_n", "k": 2}),
            id="json-body-parameters",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}], "parameters": {"policy": "any"}}).encode()},
            {"Content-Type": "application/json", "X-Ensemble-Policy": "any", "X-Ensemble-Threshold": "0.3"},
            WireRequest((A,), {"policy": "any", "threshold": "0.3"}),
            id="json-body-and-headers-agree",
        ),
    ],
)
def test_read_request(row: dict, headers: dict, expected: WireRequest) -> None:
    assert read_request(row, headers, Limits(max_images_per_request=3), ()) == expected


@pytest.mark.parametrize(
    ("row", "headers", "error", "message"),
    [
        pytest.param(
            {"body": b""},
            {},
            RequestError,
            "empty request body: send an image, multipart/form-data parts, JSON instances or a v2 request",
            id="empty",
        ),
        pytest.param(
            {"body": b"{"},
            {"Content-Type": "application/json"},
            RequestError,
            "malformed JSON body: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
            id="malformed-json",
        ),
        pytest.param(
            {"body": b'{"images": []}'},
            {"Content-Type": "application/json"},
            RequestError,
            'wrong JSON shape: expected {"instances": [{"b64": "<base64 image>"}, ...]} or a v2 request '
            '{"inputs": [...]}',
            id="json-wrong-shape",
        ),
        pytest.param(
            {"body": b'{"instances": [{"b64": 5}]}'},
            {"Content-Type": "application/json"},
            RequestError,
            'instances[0]: expected {"instances": [{"b64": "<base64 image>"}, ...]}',
            id="json-instance-shape",
        ),
        pytest.param(
            {"body": b'{"instances": [{"b64": "QUJD"}, {"b64": "QU*D"}]}'},
            {"Content-Type": "application/json"},
            InvalidImage,
            "instances[1].b64: invalid base64 (Only base64 data is allowed)",
            id="bad-base64",
        ),
        pytest.param(
            {"body": b'{"instances": [{"b64": "QUJDRA"}]}'},
            {"Content-Type": "application/json"},
            InvalidImage,
            "instances[0].b64: invalid base64 (Incorrect padding)",
            id="base64-missing-padding",
        ),
        pytest.param(
            {"body": b'{"instances": []}'},
            {"Content-Type": "application/json"},
            RequestError,
            "the request carried no image",
            id="json-no-instances",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}], "parameters": {"policy": "any"}}).encode()},
            {"Content-Type": "application/json", "X-Ensemble-Policy": "all"},
            RequestError,
            "policy given twice with different values: 'all' and 'any'",
            id="json-body-and-header-disagree",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}], "parameters": {"colour": "red"}}).encode()},
            {"Content-Type": "application/json"},
            RequestError,
            "unknown parameter(s) ['colour']; valid: policy, k, threshold, confidence, early_exit, members, "
            "top_k, sequence, min_run, uncertainty, deadline_ms, min_members",
            id="json-body-unknown-parameter",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}], "parameters": ["any"]}).encode()},
            {"Content-Type": "application/json"},
            RequestError,
            "parameters must be an object",
            id="json-body-parameters-not-an-object",
        ),
        pytest.param(
            {"body": json.dumps({"instances": [{"b64": b64(A)}] * 4}).encode()},
            {"Content-Type": "application/json"},
            PayloadTooLarge,
            "4 images in one request; this ensemble accepts at most 3",
            id="too-many-images",
        ),
        pytest.param(
            {"polcy": b"any", "body": A},
            {},
            RequestError,
            "unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); valid: policy, k, threshold, "
            "confidence, early_exit, members, top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members, and the body (over gRPC an "
            "input named body or data)",
            id="unknown-query",
        ),
        pytest.param(
            {"img": A, "polcy": b"any"},
            {"Content-Type": MULTIPART},
            RequestError,
            "unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); valid: policy, k, threshold, "
            "confidence, early_exit, members, top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members; an image part must hold an "
            "image's bytes ('polcy' holds 3 bytes of text)",
            id="multipart-misspelt-query-parameter",
        ),
        pytest.param(
            {"img": A, "colour": "red", "treshold": b"0.3"},
            {"Content-Type": MULTIPART},
            RequestError,
            "unknown parameter(s) ['colour', 'treshold'] (closest valid: 'treshold' -> 'threshold'); valid: "
            "policy, k, threshold, confidence, early_exit, members, top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members; an "
            "image part must hold an image's bytes ('colour' holds 3 bytes of text, 'treshold' holds 3 bytes of "
            "text)",
            id="multipart-text-fields-as-str-and-bytes",
        ),
        pytest.param(
            {"policy": b"any", "body": A},
            {"X-Ensemble-Policy": "all"},
            RequestError,
            "policy given twice with different values: 'any' and 'all'",
            id="conflicting-sources",
        ),
        pytest.param(
            {"policy": b"\xff", "body": A}, {}, RequestError, "policy: expected UTF-8 text", id="policy-not-utf8"
        ),
        pytest.param(
            {"body": A},
            {"Content-Type": "text/plain"},
            UnsupportedMediaType,
            "content type 'text/plain': send an image (image/* or application/octet-stream), "
            "multipart/form-data parts, application/json instances or a v2 request",
            id="wrong-content-type",
        ),
        pytest.param(
            {"body": A},
            {"Content-Type": "application/x-npy"},
            UnsupportedMediaType,
            "content type 'application/x-npy': send an image (image/* or application/octet-stream), "
            "multipart/form-data parts, application/json instances or a v2 request",
            id="tensor-to-image-ensemble",
        ),
        pytest.param(
            {"img": B, "other": C},
            {"Content-Type": MULTIPART, "Content-Length": multipart_length({"img": A, "img2": B, "other": C})},
            RequestError,
            "multipart body is larger than its parts: part names must be distinct, because TorchServe keeps "
            "only the last part of a repeated name and the others would be silently dropped",
            id="repeated-part-name",
        ),
    ],
)
def test_parse_request_rejects(row: dict, headers: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        read_request(row, headers, Limits(max_images_per_request=3), ())
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "part",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", id="binary-bytes"),
        pytest.param(b"x" * 300, id="text-longer-than-a-parameter"),
    ],
)
def test_a_multipart_part_that_is_not_short_text_stays_an_image_and_keeps_its_message(part: bytes) -> None:
    request = read_request({"img": A, "file": part}, {"Content-Type": MULTIPART}, Limits(max_images_per_request=3), ())
    assert request.inputs == (A, part)
    with pytest.raises(InvalidImage) as caught:
        decode_image(part, Limits())
    assert str(caught.value) == "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)"
