"""Read tensor instances from untrusted bytes: `.npy` (compact, zero parsing per number) or JSON lists.

JSON is the portable form, but parsing 128 x 784 decimal numbers costs far more than the model
does; a `.npy` body is a short header plus raw little-endian floats. numpy reads it, never unpickling
(`allow_pickle=False`), and only once the header it parsed (a literal of at most MAX_NPY_HEADER bytes)
has been held to the ensemble's shape, dtypes and instance limit, so numpy allocates no more than those allow.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tokenize
from typing import Any

import numpy
import torch
from numpy.lib import format as npy_format

from handlers.config.specs import Limits, TensorSpec
from handlers.errors import PayloadTooLarge, RequestError

NPY_MAGIC = b"\x93NUMPY"
NPY_DTYPES = {"<f4", "<f8", "<f2"}
NPY_VERSIONS = {(1, 0), (2, 0), (3, 0)}
MAX_NPY_HEADER = 4096
JSON_SHAPE = 'expected {"instances": [<instance>, ...]} where each instance is a nested list of numbers'
LITERAL = ".npy header is not a Python literal: {}"
KEYS = ".npy header must hold exactly 'descr', 'fortran_order' and 'shape'"
SHAPE = ".npy shape {} is not a tuple of non-negative integers"
DTYPE = ".npy dtype {} is not supported; send little-endian float32 ('<f4'), '<f8' or '<f2'"
FORTRAN = ".npy array is in Fortran order; send a C-ordered array"
# How numpy (pinned in requirements.txt) words a header it refuses, and the words our clients had before numpy read
# the headers: the text after the prefix fills the {}. The tests hold every line, so a numpy that rewords one fails.
NUMPY_HEADER_ERRORS = (
    ("Header is not a dictionary", KEYS),
    ("Header does not contain the correct keys", KEYS),
    ("shape is not valid: ", SHAPE),
    ("fortran_order is not a valid bool", FORTRAN),
    ("descr is not a valid dtype descriptor: ", DTYPE),
)


def read_npy(data: bytes, spec: TensorSpec, limits: Limits) -> torch.Tensor:
    """A `.npy` body of shape [N, *spec.shape] (or one instance of spec.shape) as float32 [N, *spec.shape]."""
    shape, fortran_order, dtype, data_start = _npy_header(data)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise RequestError(SHAPE.format(repr(shape)))
    if dtype.str not in NPY_DTYPES:
        raise RequestError(DTYPE.format(repr(dtype.str)))
    if fortran_order:
        raise RequestError(FORTRAN)
    count = _instance_count(shape, spec, limits)
    held, expected = len(data) - data_start, math.prod(shape) * dtype.itemsize
    if held != expected:
        raise RequestError(f".npy data holds {held} bytes; shape {list(shape)} of {dtype.str} needs {expected}")
    try:
        array = numpy.load(io.BytesIO(data), allow_pickle=False, max_header_size=MAX_NPY_HEADER)
    except ValueError as e:  # numpy reads the header again, a version 3 one as UTF-8 where ours read Latin-1
        raise RequestError(f".npy file is not readable: {e}") from e
    return _finite(torch.from_numpy(array).to(torch.float32).view(count, *spec.shape))


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
        raise RequestError(
            f"instances have shape {list(values.shape)}; expected [N, {', '.join(map(str, spec.shape))}]"
        )
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


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, numpy.dtype[Any], int]:
    """Shape, Fortran order, dtype and where the data starts, read by numpy from a header of bounded length."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise RequestError("not a .npy file: the body does not start with the \\x93NUMPY magic")
    stream = io.BytesIO(data)
    major, minor = version = npy_format.read_magic(stream)
    if version not in NPY_VERSIONS:
        named = str(major) if minor == 0 else f"{major}.{minor}"
        raise RequestError(f".npy format version {named} is not supported; send version 1, 2 or 3")
    length_format = "<H" if major == 1 else "<I"
    header_start = stream.tell() + struct.calcsize(length_format)
    if header_start > len(data):
        raise RequestError(f".npy file of {len(data)} bytes ends inside its header length")
    (header_len,) = struct.unpack_from(length_format, data, stream.tell())
    if header_len > MAX_NPY_HEADER or header_start + header_len > len(data):
        raise RequestError(f".npy header of {header_len} bytes is truncated or longer than {MAX_NPY_HEADER}")
    # Version 3 is version 2 with a UTF-8 header; every header we accept is ASCII, which both read alike.
    read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    # A header that is no literal numpy reads again as Python 2 wrote it, through the tokenizer: TokenError.
    try:
        shape, fortran_order, dtype = read(stream, max_header_size=MAX_NPY_HEADER)
    except (ValueError, SyntaxError, tokenize.TokenError, RecursionError, MemoryError) as e:
        raise RequestError(_refused_header(str(e))) from e
    return shape, fortran_order, dtype, stream.tell()


def _refused_header(reason: str) -> str:
    """numpy's reason for refusing a header in our words; any other is a header Python cannot evaluate."""
    for prefix, message in NUMPY_HEADER_ERRORS:
        if reason.startswith(prefix):
            return message.format(reason.removeprefix(prefix))
    return LITERAL.format(reason)


def _instance_count(shape: tuple[int, ...], spec: TensorSpec, limits: Limits) -> int:
    """N for an array of shape [N, *spec.shape] or spec.shape (N = 1); refuses any other shape."""
    if tuple(shape) == spec.shape:
        return 1
    if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
        raise RequestError(f"array of shape {list(shape)}; expected [N, {', '.join(map(str, spec.shape))}]")
    if shape[0] == 0:
        raise RequestError("the request carried no instance")
    if shape[0] > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"{shape[0]} instances in one request; this ensemble accepts at most {limits.max_images_per_request}"
        )
    return shape[0]


def _finite(values: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise RequestError("instances contain NaN or infinite values")
    return values
