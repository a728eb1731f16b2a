"""Clients for the protocol tests: v2 bodies and answers, gRPC stubs generated from TorchServe's own protos, and
Triton's own HTTP client (`tritonclient.http`) pointed at our Open Inference Protocol gateway.

TorchServe's protos ship in TorchServe's `model-server.jar` (`proto/inference.proto` and the files it
imports); generating from them, rather than from a copy kept here, tests against exactly the
service the pinned TorchServe serves. `google/rpc/status.proto` comes from googleapis-common-protos
and the well-known types from grpcio-tools.
"""

from __future__ import annotations

import base64
import importlib
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import google.rpc
import grpc
import grpc_tools
import numpy
import pytest
import tritonclient.http as triton
import ts
from grpc_tools import protoc

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
PROTOS = ("inference.proto",)
# What the gateway's GET /v2 answers.
SERVER_METADATA = {"name": "ensemble-torchserve", "version": "0.12.0", "extensions": []}
# tritonclient's health calls on the trio ensemble (version 2.1), with what each must answer.
HEALTH_CALLS = [
    pytest.param("is_server_live", (), True, id="server-live"),
    pytest.param("is_server_ready", (), True, id="server-ready"),
    pytest.param("is_model_ready", ("trio",), True, id="model-ready"),
    pytest.param("is_model_ready", ("trio", "2.1"), True, id="model-version-ready"),
    pytest.param("is_model_ready", ("nosuch",), False, id="unknown-model"),
    pytest.param("is_model_ready", ("trio", "9.9"), False, id="unknown-version"),
]
# (name, datatype, shape) of trio's v2 outputs (multiclass over 3 labels, members mobile, pool_rgb, pool_gray).
TRIO_OUTPUTS = [
    ("label", "BYTES", [-1]),
    ("scores", "FP64", [-1, 3]),
    ("top_labels", "BYTES", [-1, -1]),
    ("top_scores", "FP64", [-1, -1]),
    ("mobile.label", "BYTES", [-1]),
    ("mobile.scores", "FP64", [-1, 3]),
    ("pool_rgb.label", "BYTES", [-1]),
    ("pool_rgb.scores", "FP64", [-1, 3]),
    ("pool_gray.label", "BYTES", [-1]),
    ("pool_gray.scores", "FP64", [-1, 3]),
    ("missing", "BYTES", [-1]),
    ("partial", "BOOL", [-1]),
    ("skipped", "BYTES", [-1]),
    ("deferred", "BOOL", [-1]),
    ("entropy", "FP64", [-1]),
    ("expected_entropy", "FP64", [-1]),
    ("mutual_information", "FP64", [-1]),
    ("vote_margin", "FP64", [-1]),
]
IMAGES_INPUT = ("data", "BYTES", [-1])
# What the gateway answers a request without the inference token, and what TorchServe itself answers.
REFUSED = {
    "error": "Token Authorization failed: send TorchServe's inference key (key_file.json, inference.key) "
    "as 'Authorization: Bearer <key>', as TorchServe's inference API requires"
}
TORCHSERVE_REFUSED = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
}


def generate(into: Path) -> tuple[ModuleType, ModuleType]:
    """Extract TorchServe's protos into `into`, compile them, and return (inference_pb2, inference_pb2_grpc)."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(JAR) as jar:
        for name in PROTOS:
            (into / name).write_bytes(jar.read(f"proto/{name}"))
    includes = [
        f"-I{into}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"-I{Path(next(iter(google.rpc.__path__))).parent.parent}",
    ]
    args = [
        "protoc",
        *includes,
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        *(str(into / name) for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTOS} from {JAR}")
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(into))


def v2_body(images: list[bytes], **fields: Any) -> dict[str, Any]:
    """A v2 request carrying `images` as one BYTES tensor of base64 strings."""
    data = [base64.b64encode(image).decode() for image in images]
    return {"inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES", "data": data}], **fields}


def v2_as_predictions(body: dict[str, Any], members: list[str], labels: list[str]) -> list[dict[str, Any]]:
    """A v2 answer of a single-label ensemble in our JSON form, for `assert_answers` (tests/fixture_reference.py)."""
    tensors = {output["name"]: output["data"] for output in body["outputs"]}

    def view(prefix: str, i: int) -> dict[str, Any]:
        label = tensors[f"{prefix}label"][i]
        scores = tensors[f"{prefix}scores"][i * len(labels) : (i + 1) * len(labels)]
        return {"label": label or None, "score": scores[labels.index(label)] if label else None}

    return [{**view("", i), "members": {m: view(f"{m}.", i) for m in members}} for i in range(len(tensors["label"]))]


def grpc_predict(
    stubs: tuple[ModuleType, ModuleType],
    channel: grpc.Channel,
    name: str,
    inputs: dict[str, bytes],
    *,
    token: str | None,
    timeout: float = 60,
) -> Any:
    """TorchServe's `Predictions` call; `token` is the inference key, sent as gRPC metadata when given."""
    messages, services = stubs
    metadata = [("authorization", f"Bearer {token}")] if token else []
    request = messages.PredictionsRequest(model_name=name, input=inputs)
    return services.InferenceAPIsServiceStub(channel).Predictions(request, metadata=metadata, timeout=timeout)


def v2_labels(body: dict[str, Any], output: str = "label") -> list[Any]:
    """One output tensor's data from a v2 answer."""
    return next(o["data"] for o in body["outputs"] if o["name"] == output)


def triton_client(base_url: str) -> triton.InferenceServerClient:
    """tritonclient's HTTP client on a base URL (it takes host:port, without the scheme)."""
    return triton.InferenceServerClient(url=base_url.removeprefix("http://"))


def triton_images(images: list[bytes]) -> triton.InferInput:
    """`images` as tritonclient's BYTES input of base64 strings, its data sent as JSON (our handler refuses the binary
    extension)."""
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(
        numpy.array([base64.b64encode(image).decode() for image in images], dtype=object), binary_data=False
    )
    return tensor


def model_metadata(
    name: str, version: str, input_: tuple[str, str, list[int]], outputs: list[tuple[str, str, list[int]]]
) -> dict[str, Any]:
    """The v2 model metadata the gateway answers, from (name, datatype, shape) triples."""
    fields = ("name", "datatype", "shape")
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch_torchserve",
        "inputs": [dict(zip(fields, input_, strict=True))],
        "outputs": [dict(zip(fields, output, strict=True)) for output in outputs],
    }
