"""Read tensor instances from untrusted bytes: `.npy` (compact, zero parsing per number) or JSON lists.

JSON is the portable form, but parsing 128 x 784 decimal numbers costs far more than the model
does; a `.npy` body is a short header plus raw little-endian floats. The header is read with
`ast.literal_eval` on a bounded string and nothing is ever unpickled: object arrays are refused.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import struct
from typing import Any

import torch

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import PayloadTooLarge, RequestError

NPY_MAGIC = b"\x93NUMPY"
NPY_DTYPES = {"<f4": torch.float32, "<f8": torch.float64, "<f2": torch.float16}
MAX_NPY_HEADER = 4096
JSON_SHAPE = 'expected {"instances": [<instance>, ...]} where each instance is a nested list of numbers'


def read_npy(data: bytes, spec: TensorSpec, limits: Limits) -> torch.Tensor:
    """A `.npy` body of shape [N, *spec.shape] (or one instance of spec.shape) as float32 [N, *spec.shape]."""
    if not data.startswith(NPY_MAGIC) or len(data) < 10:
        raise RequestError("not a .npy file: the body does not start with the \\x93NUMPY magic")
    major = data[6]
    if major == 1:
        (header_len,), start = struct.unpack_from("<H", data, 8), 10
    elif major in (2, 3) and len(data) >= 12:
        (header_len,), start = struct.unpack_from("<I", data, 8), 12
    else:
        raise RequestError(f".npy format version {major} is not supported; send version 1, 2 or 3")
    if header_len > MAX_NPY_HEADER or start + header_len > len(data):
        raise RequestError(f".npy header of {header_len} bytes is truncated or longer than {MAX_NPY_HEADER}")
    header = _npy_header(data[start : start + header_len])
    descr, shape = header["descr"], header["shape"]
    if descr not in NPY_DTYPES:
        raise RequestError(f".npy dtype {descr!r} is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'")
    if header["fortran_order"] is not False:
        raise RequestError(".npy array is in Fortran order; send a C-ordered array")
    count = _instance_count(shape, spec, limits)
    dtype = NPY_DTYPES[descr]
    payload = memoryview(data)[start + header_len :]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(payload) != expected:
        raise RequestError(f".npy data holds {len(payload)} bytes; shape {list(shape)} of {descr} needs {expected}")
    values = torch.frombuffer(bytearray(payload), dtype=dtype).to(torch.float32)
    return _finite(values.view(count, *spec.shape))


def read_json_instances(body: bytes | str | Any, spec: TensorSpec, limits: Limits) -> torch.Tensor:
    """`{"instances": [[...], ...]}` as float32 [N, *spec.shape]; `body` may already be parsed JSON."""
    try:
        doc = json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from e
    if not isinstance(doc, dict) or set(doc) != {"instances"} or not isinstance(doc["instances"], list):
        raise RequestError(f"wrong JSON shape: {JSON_SHAPE}")
    try:
        values = torch.tensor(doc["instances"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise RequestError(f"instances are not nested lists of numbers of one shape: {e}") from e
    if values.dim() != len(spec.shape) + 1:
        raise RequestError(f"instances have shape {list(values.shape)}; expected [N, {', '.join(map(str, spec.shape))}]")
    _instance_count(tuple(values.shape), spec, limits)
    return _finite(values)


def instances_from_values(
    values: list[Any], shape: tuple[int, ...], dtype: torch.dtype, spec: TensorSpec, limits: Limits
) -> torch.Tensor:
    """Flat row-major numbers of a declared `shape` and `dtype` (a v2 input tensor) as float32 [N, *spec.shape].

    The numbers are first held in `dtype`, so an FP16 input is rounded as the client's own tensor was.
    """
    count = _instance_count(shape, spec, limits)
    if any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in values):
        raise RequestError("tensor data must be numbers")
    try:
        tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
    except (OverflowError, RuntimeError) as e:
        raise RequestError(f"tensor data does not fit its datatype: {e}") from e
    return _finite(tensor.to(torch.float32).view(count, *spec.shape))


@functools.lru_cache(maxsize=64)
def _npy_header(raw: bytes) -> dict[str, Any]:
    """The parsed header; cached because a client sends the same few headers again and again."""
    try:
        header = ast.literal_eval(raw.decode("latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise RequestError(f".npy header is not a Python literal: {e}") from e
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise RequestError(".npy header must hold exactly 'descr', 'fortran_order' and 'shape'")
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise RequestError(f".npy shape {shape!r} is not a tuple of non-negative integers")
    return header


def _instance_count(shape: tuple[int, ...], spec: TensorSpec, limits: Limits) -> int:
    """N for an array of shape [N, *spec.shape] or spec.shape (N = 1); refuses any other shape."""
    if tuple(shape) == spec.shape:
        return 1
    if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
        raise RequestError(f"array of shape {list(shape)}; expected [N, {', '.join(map(str, spec.shape))}]")
    if shape[0] == 0:
        raise RequestError("the request carried no instance")
    if shape[0] > limits.max_images_per_request:
        raise PayloadTooLarge(f"{shape[0]} instances in one request; this ensemble accepts at most {limits.max_images_per_request}")
    return shape[0]


def _finite(values: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise RequestError("instances contain NaN or infinite values")
    return values
