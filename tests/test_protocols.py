"""KServe v1, Open Inference Protocol v2 and gRPC against a real TorchServe on 127.0.0.1, with the real token.

The gRPC client's stubs are generated here from the protos inside the installed TorchServe
(`tests/grpc_stubs.py`). Every request loop is bounded, and every answer is compared with the
in-process reference of the same members.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import requests

from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from tests.conftest import assert_same_predictions, image_bytes, instances, reference, tensor_reference
from tests.protocol_clients import generate, grpc_predict, v2_as_predictions, v2_body, v2_labels

pytestmark = pytest.mark.integration
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = private_server(tmp_path_factory.mktemp("torchserve"), test_store, port_offset=10300)
    try:
        start(instance, test_store)
        for name in ("trio", "tags", "vectors"):
            register(instance, name, workers=1)
        yield instance
    finally:
        stop(instance)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return generate(tmp_path_factory.mktemp("grpc_stubs"))


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.setting('grpc_inference_port')}") as opened:
        yield opened


def post(server: Server, path: str, body: Any, **headers: str) -> requests.Response:
    return requests.post(
        f"{server.inference}/{path}",
        data=json.dumps(body),
        headers={**server.headers("inference"), "Content-Type": "application/json", **headers},
        timeout=TIMEOUT,
    )


TRIO_MEMBERS = ["mobile", "pool_rgb", "pool_gray"]
TRIO_LABELS = ["cat", "dog", "fox"]


def test_v1_predict(server: Server, test_store: Path) -> None:
    images = [image_bytes(1), image_bytes(2, fmt="JPEG"), image_bytes(3)]
    instances = [{"b64": base64.b64encode(d).decode()} for d in images]
    response = post(server, "v1/models/trio:predict", {"instances": instances})
    assert response.status_code == 200
    assert_same_predictions(response.json()["predictions"], reference(test_store, "trio", images))
    chosen = post(server, "predictions/trio", {"instances": instances, "parameters": {"policy": "k_of_n", "k": 2}})
    assert chosen.json()["policy"] == {"name": "k_of_n", "params": {"k": 2}}
    assert_same_predictions(chosen.json()["predictions"], reference(test_store, "trio", images, policy="k_of_n", k="2"))


@pytest.mark.parametrize("path", ["v2/models/trio/infer", "predictions/trio"], ids=["v2-route", "predictions-route"])
def test_v2_infer(server: Server, test_store: Path, path: str) -> None:
    images = [image_bytes(4), image_bytes(5), image_bytes(6, size=(64, 48))]
    response = post(server, path, v2_body(images, id="abc-1", parameters={"policy": "majority"}))
    assert response.status_code == 200
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"], body["parameters"]["policy"]) == ("trio", "2.1", "abc-1", "majority")
    expected = reference(test_store, "trio", images, policy="majority")
    assert_same_predictions(v2_as_predictions(body, TRIO_MEMBERS, TRIO_LABELS), expected)


def test_v2_error_is_a_v2_body_with_its_status(server: Server) -> None:
    response = post(server, "v2/models/trio/infer", {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]})
    assert response.status_code == 400
    assert response.json() == {"error": "inputs[0].data[0]: invalid base64 (Only base64 data is allowed)"}


def test_v2_requests_from_8_clients_are_batched_and_split_back(server: Server, test_store: Path) -> None:
    """16 v2 requests of 1..4 images from 8 concurrent clients: TorchServe batches them, each gets its own answer."""
    payloads = [[image_bytes(300 + 10 * r + i) for i in range(1 + r % 4)] for r in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda images: post(server, "v2/models/trio/infer", v2_body(images)), payloads))
    assert [r.status_code for r in responses] == [200] * 16
    for response, images in zip(responses, payloads, strict=True):
        assert_same_predictions(v2_as_predictions(response.json(), TRIO_MEMBERS, TRIO_LABELS), reference(test_store, "trio", images))
    batch_sizes = [int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses]
    assert max(batch_sizes) >= 2, f"TorchServe did not batch any v2 requests together: {batch_sizes}"


def test_v2_multilabel_and_tensor_ensembles(server: Server, test_store: Path) -> None:
    images = [image_bytes(7), image_bytes(8)]
    tags = post(server, "v2/models/tags/infer", v2_body(images)).json()
    expected = reference(test_store, "tags", images)
    assert v2_labels(tags, "labels") == [label in p["labels"] for p in expected for label in ("red", "round")]
    values = instances(9, 3)
    doc = {"inputs": [{"name": "x", "shape": [3, 3, 4], "datatype": "FP32", "data": values.flatten().tolist()}]}
    vectors = post(server, "v2/models/vectors/infer", doc).json()
    assert v2_labels(vectors) == [p["label"] for p in tensor_reference(test_store, "vectors", values)]


@pytest.mark.parametrize(
    "params",
    [{"policy": "max"}, {"policy": "max", "members": "pool_rgb,mobile", "top_k": "3"}],
    ids=["policy", "policy-members-top-k"],
)
def test_grpc_raw_image_answers_the_rest_json(
    server: Server, test_store: Path, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel, params: dict[str, str]
) -> None:
    image = image_bytes(10)
    inputs = {"data": image, **{key: value.encode() for key, value in params.items()}}
    answer = json.loads(grpc_predict(stubs, channel, "trio", inputs, token=server.key("inference")).prediction)
    headers = {f"X-Ensemble-{key.title().replace('_', '-')}": value for key, value in params.items()}
    rest = requests.post(f"{server.inference}/predictions/trio", data=image, headers={**server.headers("inference"), **headers}, timeout=TIMEOUT)
    assert answer["policy"] == {"name": "max", "params": {}}
    assert answer["answered_by"] == rest.json()["answered_by"] == ["mobile", "pool_rgb", "pool_gray"][: 2 if "members" in params else 3]
    assert answer["predictions"] == rest.json()["predictions"]
    assert_same_predictions(answer["predictions"], reference(test_store, "trio", [image], **params))


def test_grpc_v2_body_as_the_kserve_wrapper_sends_it(server: Server, test_store: Path, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel) -> None:
    images = [image_bytes(11), image_bytes(12)]
    payload = json.dumps(v2_body(images, id="grpc-1")).encode()
    answer = json.loads(grpc_predict(stubs, channel, "trio", {"data": payload}, token=server.key("inference")).prediction)
    assert answer["id"] == "grpc-1"
    assert_same_predictions(v2_as_predictions(answer, TRIO_MEMBERS, TRIO_LABELS), reference(test_store, "trio", images))


def test_grpc_from_8_clients(server: Server, test_store: Path, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel) -> None:
    images = [image_bytes(400 + i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda image: grpc_predict(stubs, channel, "trio", {"data": image}, token=server.key("inference")), images))
    for reply, image in zip(replies, images, strict=True):
        assert_same_predictions(json.loads(reply.prediction)["predictions"], reference(test_store, "trio", [image]))


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param({"data": b"not an image"}, {"code": 400, "type": "InvalidImage", "message": "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)"}, id="bad-image"),
        pytest.param({"image": b"x"}, {"code": 400, "type": "RequestError", "message": "unknown parameter(s) ['image']; valid: policy, k, threshold, members, top_k, sequence, min_run, and the body (over gRPC an input named body or data)"}, id="wrong-input-name"),
        pytest.param({"data": json.dumps({"inputs": []}).encode()}, {"error": "inputs must be a list of exactly one tensor object, got 0"}, id="bad-v2"),
    ],
)
def test_grpc_errors_arrive_as_status_ok_with_the_error_json(
    server: Server, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel, inputs: dict[str, bytes], expected: dict
) -> None:
    """TorchServe's gRPC path drops per-request status codes: the call succeeds, the body carries the error."""
    assert json.loads(grpc_predict(stubs, channel, "trio", inputs, token=server.key("inference")).prediction) == expected


def test_grpc_unknown_model_is_internal(server: Server, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel) -> None:
    """Unlike REST's 404, TorchServe 0.12 answers a gRPC call for an unregistered model with INTERNAL."""
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(stubs, channel, "nosuch", {"data": image_bytes(14)}, token=server.key("inference"))
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INTERNAL, "Model not found: nosuch\norg.pytorch.serve.archive.model.ModelNotFoundException")


def test_grpc_without_token_is_refused(server: Server, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(stubs, channel, "trio", {"data": image_bytes(13)}, token=None)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
