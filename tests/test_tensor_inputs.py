"""Tensor instances from .npy and JSON bodies: exact values through, every malformed body a clear 4xx."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy
import pytest
import torch

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.inputs.requests import read_tensor_request
from handlers.inputs.tensors import read_json_instances, read_npy
from tests.conftest import NPY, instances, npy_bytes

SPEC = TensorSpec(shape=(3, 4))
LIMITS = Limits(max_images_per_request=5)


def npy_with_header(header: str, data: bytes = b"", *, version: int = 1) -> bytes:
    """A hand-made .npy file, to reach header cases numpy itself never writes."""
    raw = header.encode("latin-1")
    length = struct.pack("<H", len(raw)) if version == 1 else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes([version, 0]) + length + raw + data


@pytest.mark.parametrize(
    ("values", "expected_shape"),
    [
        pytest.param(instances(1, 3), (3, 3, 4), id="float32-batch"),
        pytest.param(instances(2, 1)[0], (1, 3, 4), id="one-instance-without-batch-dim"),
        pytest.param(instances(3, 2).astype(numpy.float64), (2, 3, 4), id="float64-converted"),
        pytest.param(instances(4, 2).astype(numpy.float16), (2, 3, 4), id="float16-converted"),
    ],
)
def test_npy_values_arrive_exactly(values: numpy.ndarray, expected_shape: tuple[int, ...]) -> None:
    tensor = read_npy(npy_bytes(values), SPEC, LIMITS)
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == expected_shape
    assert torch.equal(tensor, torch.from_numpy(values.astype(numpy.float32)).reshape(expected_shape))


def test_npy_version_2_header_is_read() -> None:
    values = instances(5, 2)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }"
    tensor = read_npy(npy_with_header(header, values.tobytes(), version=2), SPEC, LIMITS)
    assert torch.equal(tensor, torch.from_numpy(values))


GOOD = instances(6, 2)
HEADER = "{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        pytest.param(
            b"not npy at all",
            RequestError,
            "not a .npy file: the body does not start with the \\x93NUMPY magic",
            id="no-magic",
        ),
        pytest.param(
            b"\x93NUMPY\x09\x00\x10\x00",
            RequestError,
            ".npy format version 9 is not supported; send version 1, 2 or 3",
            id="version",
        ),
        pytest.param(
            npy_bytes(GOOD)[:20],
            RequestError,
            ".npy header of 118 bytes is truncated or longer than 4096",
            id="truncated-header",
        ),
        pytest.param(
            npy_with_header("__import__('os')"),
            RequestError,
            ".npy header is not a Python literal: malformed node or string on line 1: <ast.Call object at",
            id="header-code",
        ),
        pytest.param(
            npy_with_header("{'descr': '<f4', 'shape': (2, 3, 4)}"),
            RequestError,
            ".npy header must hold exactly 'descr', 'fortran_order' and 'shape'",
            id="header-keys",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=False, shape="(2, -3, 4)")),
            RequestError,
            ".npy shape (2, -3, 4) is not a tuple of non-negative integers",
            id="negative-dim",
        ),
        pytest.param(
            npy_bytes(GOOD.astype(">f4")),
            RequestError,
            ".npy dtype '>f4' is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'",
            id="big-endian",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="|O", fortran=False, shape="(2, 3, 4)")),
            RequestError,
            ".npy dtype '|O' is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'",
            id="object-pickle",
        ),
        pytest.param(
            npy_bytes(GOOD.astype(numpy.int64)),
            RequestError,
            ".npy dtype '<i8' is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'",
            id="int64",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=True, shape="(2, 3, 4)"), GOOD.tobytes()),
            RequestError,
            ".npy array is in Fortran order; send a C-ordered array",
            id="fortran",
        ),
        pytest.param(
            npy_bytes(numpy.zeros((2, 4, 3), numpy.float32)),
            RequestError,
            "array of shape [2, 4, 3]; expected [N, 3, 4]",
            id="wrong-shape",
        ),
        pytest.param(
            npy_bytes(numpy.zeros((0, 3, 4), numpy.float32)),
            RequestError,
            "the request carried no instance",
            id="zero-instances",
        ),
        pytest.param(
            npy_bytes(numpy.zeros((6, 3, 4), numpy.float32)),
            PayloadTooLarge,
            "6 instances in one request; this ensemble accepts at most 5",
            id="too-many",
        ),
        pytest.param(
            npy_bytes(GOOD)[:-4],
            RequestError,
            ".npy data holds 92 bytes; shape [2, 3, 4] of <f4 needs 96",
            id="data-short",
        ),
        pytest.param(
            npy_bytes(GOOD) + b"\0",
            RequestError,
            ".npy data holds 97 bytes; shape [2, 3, 4] of <f4 needs 96",
            id="data-long",
        ),
        pytest.param(
            npy_bytes(numpy.full((1, 3, 4), numpy.nan, numpy.float32)),
            RequestError,
            "instances contain NaN or infinite values",
            id="nan",
        ),
        pytest.param(
            npy_bytes(numpy.full((1, 3, 4), numpy.inf, numpy.float32)),
            RequestError,
            "instances contain NaN or infinite values",
            id="inf",
        ),
    ],
)
def test_bad_npy_is_refused_with_a_clear_message(body: bytes, error: type[RequestError], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        read_npy(body, SPEC, LIMITS)
    assert type(caught.value) is error
    assert str(caught.value).startswith(message)


def test_npy_version_3_header_is_read() -> None:
    values = instances(9, 2)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }"
    tensor = read_npy(npy_with_header(header, values.tobytes(), version=3), SPEC, LIMITS)
    assert torch.equal(tensor, torch.from_numpy(values))


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        pytest.param(
            b"\x93NUMPY\x01\x01\x10\x00",
            RequestError,
            ".npy format version 1.1 is not supported; send version 1, 2 or 3",
            id="minor-version",
        ),
        pytest.param(
            b"\x93NUMPY\x02\x00\x10\x00",
            RequestError,
            ".npy file of 10 bytes ends inside its header length",
            id="short-header-length",
        ),
        pytest.param(
            npy_with_header("{" + " " * 4096 + "}", version=2),
            RequestError,
            ".npy header of 4098 bytes is truncated or longer than 4096",
            id="header-too-long",
        ),
        pytest.param(
            npy_with_header("[1, 2]"),
            RequestError,
            ".npy header must hold exactly 'descr', 'fortran_order' and 'shape'",
            id="header-not-dict",
        ),
        pytest.param(
            npy_with_header("{'descr': "),
            RequestError,
            ".npy header is not a Python literal: ('EOF in multi-line statement', (2, 0))",
            id="header-syntax",
        ),
        pytest.param(
            npy_with_header("-" * 4000 + "1"),
            RequestError,
            ".npy header is not a Python literal: maximum recursion depth exceeded",
            id="header-deep",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=False, shape="(2, 'a', 4)")),
            RequestError,
            ".npy shape (2, 'a', 4) is not a tuple of non-negative integers",
            id="text-dim",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=False, shape="(True, 3, 4)")),
            RequestError,
            ".npy shape (True, 3, 4) is not a tuple of non-negative integers",
            id="bool-dim",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=1, shape="(2, 3, 4)"), GOOD.tobytes()),
            RequestError,
            ".npy array is in Fortran order; send a C-ordered array",
            id="fortran-not-bool",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f9", fortran=False, shape="(2, 3, 4)")),
            RequestError,
            ".npy dtype '<f9' is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'",
            id="unknown-dtype",
        ),
        pytest.param(
            npy_with_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3, 4)}"),
            RequestError,
            ".npy dtype '|V4' is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'",
            id="structured-dtype",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=False, shape="(10**9, 3, 4)")),
            RequestError,
            ".npy header is not a Python literal: malformed node or string",
            id="expression-dim",
        ),
        pytest.param(
            npy_with_header(HEADER.format(descr="<f4", fortran=False, shape="(1000000000, 3, 4)")),
            PayloadTooLarge,
            "1000000000 instances in one request; this ensemble accepts at most 5",
            id="huge-count-before-allocation",
        ),
        pytest.param(
            npy_with_header(
                HEADER.format(descr="<f4", fortran=False, shape="(2, 3, 4)") + " # \xff", GOOD.tobytes(), version=3
            ),
            RequestError,
            ".npy file is not readable: 'utf-8' codec can't decode byte 0xff in position 65",
            id="version-3-not-utf8",
        ),
    ],
)
def test_headers_numpy_refuses_keep_our_messages(body: bytes, error: type[RequestError], message: str) -> None:
    """numpy reads the header; each way it refuses one reaches the client as the message it had before."""
    with pytest.raises(RequestError) as caught:
        read_npy(body, SPEC, LIMITS)
    assert type(caught.value) is error
    assert str(caught.value).startswith(message)


def test_json_instances_equal_npy_instances() -> None:
    values = instances(7, 3)
    from_json = read_json_instances(json.dumps({"instances": values.tolist()}).encode(), SPEC, LIMITS)
    assert torch.equal(from_json, read_npy(npy_bytes(values), SPEC, LIMITS))


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        pytest.param(
            b"{", RequestError, "malformed JSON body: Expecting property name enclosed in double quotes", id="not-json"
        ),
        pytest.param(
            b'{"data": []}', RequestError, 'wrong JSON shape: expected {"instances": [<instance>, ...]}', id="wrong-key"
        ),
        pytest.param(
            b'{"instances": [[[1, 2, 3, 4]], [[1]]]}',
            RequestError,
            "instances are not nested lists of numbers of one shape",
            id="ragged",
        ),
        pytest.param(
            b'{"instances": [[["a", 2, 3, 4]]]}',
            RequestError,
            "instances are not nested lists of numbers of one shape",
            id="strings",
        ),
        pytest.param(
            json.dumps({"instances": [0.5] * 12}).encode(),
            RequestError,
            "instances have shape [12]; expected [N, 3, 4]",
            id="flat",
        ),
        pytest.param(
            json.dumps({"instances": GOOD.transpose(0, 2, 1).tolist()}).encode(),
            RequestError,
            "array of shape [2, 4, 3]; expected [N, 3, 4]",
            id="transposed",
        ),
        pytest.param(
            json.dumps({"instances": instances(8, 6).tolist()}).encode(),
            PayloadTooLarge,
            "6 instances in one request; this ensemble accepts at most 5",
            id="too-many",
        ),
        pytest.param(
            b'{"instances": [[[NaN, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]}',
            RequestError,
            "instances contain NaN or infinite values",
            id="nan-literal",
        ),
        pytest.param(b'{"instances": []}', RequestError, "instances have shape [0]; expected [N, 3, 4]", id="empty"),
    ],
)
def test_bad_json_instances_are_refused(body: bytes, error: type[RequestError], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        read_json_instances(body, SPEC, LIMITS)
    assert type(caught.value) is error
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("row", "headers", "error", "message"),
    [
        pytest.param(
            {"body": b"\x89PNG"},
            {"Content-Type": "image/png"},
            UnsupportedMediaType,
            "content type 'image/png': this ensemble takes tensors as application/x-npy",
            id="image",
        ),
        pytest.param(
            {"body": b"x"},
            {},
            UnsupportedMediaType,
            "content type 'none': this ensemble takes tensors",
            id="no-content-type",
        ),
        pytest.param(
            {"body": b""},
            NPY,
            RequestError,
            "empty request body: send an application/x-npy array, JSON instances or a v2 request",
            id="empty",
        ),
        pytest.param(
            {"body": npy_bytes(GOOD), "colour": b"red"},
            NPY,
            RequestError,
            "unknown parameter(s) ['colour']; valid: policy, k, threshold, confidence, early_exit, members, "
            "top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members, and the body (over gRPC an input named body or data)",
            id="unknown-param",
        ),
    ],
)
def test_tensor_requests_need_a_tensor_content_type(
    row: dict[str, Any], headers: dict[str, str], error: type[RequestError], message: str
) -> None:
    with pytest.raises(RequestError) as caught:
        read_tensor_request(row, headers, LIMITS, SPEC, ())
    assert type(caught.value) is error
    assert str(caught.value).startswith(message)


def test_tensor_request_carries_its_policy() -> None:
    parsed = read_tensor_request(
        {"body": npy_bytes(GOOD), "policy": b"max"}, {**NPY, "X-Ensemble-Threshold": "0.3"}, LIMITS, SPEC, ()
    )
    assert dict(parsed.parameters) == {"policy": "max", "threshold": "0.3"}
    assert isinstance(parsed.inputs, torch.Tensor)
    assert torch.equal(parsed.inputs, torch.from_numpy(GOOD))


def test_json_instances_carry_parameters_in_the_body() -> None:
    body = json.dumps({"instances": GOOD.tolist(), "parameters": {"policy": "k_of_n", "k": 1}}).encode()
    parsed = read_tensor_request(
        {"body": body}, {"Content-Type": "application/json", "X-Ensemble-Policy": "k_of_n"}, LIMITS, SPEC, ()
    )
    assert dict(parsed.parameters) == {"policy": "k_of_n", "k": 1}
    assert isinstance(parsed.inputs, torch.Tensor)
    assert torch.equal(parsed.inputs, torch.from_numpy(GOOD))
