"""KServe v1, Open Inference Protocol v2 and gRPC against a real TorchServe on 127.0.0.1, with the real token.

The gRPC client's stubs are generated here from the protos inside the installed TorchServe
(`tests/grpc_stubs.py`). Every request loop is bounded, and every answer is compared with the
independent reference (tests/fixture_reference.py: the members' own modules, the documented policies). The v2
health and metadata routes are asked through our gateway (`gateway/open_inference.py`, which `start` runs next to
TorchServe) by Triton's own client.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import psutil
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from archive_scripts.torchserve_ctl import (
    ROOT,
    Server,
    private_server,
    register,
    start,
    start_gateway,
    stop,
    stop_gateway,
)
from archive_scripts.waiting import wait_for
from tests.conftest import image_bytes, instances
from tests.fixture_reference import assert_answers, expected_answers, labels_and_scores
from tests.protocol_clients import (
    HEALTH_CALLS,
    IMAGES_INPUT,
    REFUSED,
    SERVER_METADATA,
    TORCHSERVE_REFUSED,
    TRIO_OUTPUTS,
    generate,
    grpc_predict,
    model_metadata,
    triton_client,
    triton_images,
    v2_as_predictions,
    v2_body,
    v2_labels,
)

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
    assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", images))
    chosen = post(server, "predictions/trio", {"instances": instances, "parameters": {"policy": "k_of_n", "k": 2}})
    assert chosen.json()["policy"] == {"name": "k_of_n", "params": {"k": 2}}
    assert_answers(chosen.json()["predictions"], expected_answers(test_store, "trio", images, policy="k_of_n", k="2"))


@pytest.mark.parametrize("path", ["v2/models/trio/infer", "predictions/trio"], ids=["v2-route", "predictions-route"])
def test_v2_infer(server: Server, test_store: Path, path: str) -> None:
    images = [image_bytes(4), image_bytes(5), image_bytes(6, size=(64, 48))]
    response = post(server, path, v2_body(images, id="abc-1", parameters={"policy": "majority"}))
    assert response.status_code == 200
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"], body["parameters"]["policy"]) == (
        "trio",
        "2.1",
        "abc-1",
        "majority",
    )
    expected = expected_answers(test_store, "trio", images, policy="majority")
    assert_answers(v2_as_predictions(body, TRIO_MEMBERS, TRIO_LABELS), labels_and_scores(expected))


def test_v2_error_is_a_v2_body_with_its_status(server: Server) -> None:
    response = post(
        server,
        "v2/models/trio/infer",
        {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "inputs[0].data[0]: invalid base64 (Only base64 data is allowed)"}


def test_v2_requests_from_8_clients_are_batched_and_split_back(server: Server, test_store: Path) -> None:
    """16 v2 requests of 1..4 images from 8 concurrent clients: TorchServe batches them, each gets its own answer."""
    payloads = [[image_bytes(300 + 10 * r + i) for i in range(1 + r % 4)] for r in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda images: post(server, "v2/models/trio/infer", v2_body(images)), payloads))
    assert [r.status_code for r in responses] == [200] * 16
    for response, images in zip(responses, payloads, strict=True):
        assert_answers(
            v2_as_predictions(response.json(), TRIO_MEMBERS, TRIO_LABELS),
            labels_and_scores(expected_answers(test_store, "trio", images)),
        )
    batch_sizes = [int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses]
    assert max(batch_sizes) >= 2, f"TorchServe did not batch any v2 requests together: {batch_sizes}"


def test_v2_multilabel_and_tensor_ensembles(server: Server, test_store: Path) -> None:
    images = [image_bytes(7), image_bytes(8)]
    tags = post(server, "v2/models/tags/infer", v2_body(images)).json()
    expected = expected_answers(test_store, "tags", images)
    assert v2_labels(tags, "labels") == [label in p["labels"] for p in expected for label in ("red", "round")]
    values = instances(9, 3)
    doc = {"inputs": [{"name": "x", "shape": [3, 3, 4], "datatype": "FP32", "data": values.flatten().tolist()}]}
    vectors = post(server, "v2/models/vectors/infer", doc).json()
    assert v2_labels(vectors) == [p["label"] for p in expected_answers(test_store, "vectors", values)]


@pytest.mark.parametrize(
    "params",
    [{"policy": "max"}, {"policy": "max", "members": "pool_rgb,mobile", "top_k": "3"}],
    ids=["policy", "policy-members-top-k"],
)
def test_grpc_raw_image_answers_the_rest_json(
    server: Server,
    test_store: Path,
    stubs: tuple[ModuleType, ModuleType],
    channel: grpc.Channel,
    params: dict[str, str],
) -> None:
    image = image_bytes(10)
    inputs = {"data": image, **{key: value.encode() for key, value in params.items()}}
    answer = json.loads(grpc_predict(stubs, channel, "trio", inputs, token=server.key("inference")).prediction)
    headers = {f"X-Ensemble-{key.title().replace('_', '-')}": value for key, value in params.items()}
    rest = requests.post(
        f"{server.inference}/predictions/trio",
        data=image,
        headers={**server.headers("inference"), **headers},
        timeout=TIMEOUT,
    )
    assert answer["policy"] == {"name": "max", "params": {}}
    assert (
        answer["answered_by"]
        == rest.json()["answered_by"]
        == ["mobile", "pool_rgb", "pool_gray"][: 2 if "members" in params else 3]
    )
    assert answer["predictions"] == rest.json()["predictions"]
    assert_answers(answer["predictions"], expected_answers(test_store, "trio", [image], **params))


def test_grpc_v2_body_as_the_kserve_wrapper_sends_it(
    server: Server, test_store: Path, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel
) -> None:
    images = [image_bytes(11), image_bytes(12)]
    payload = json.dumps(v2_body(images, id="grpc-1")).encode()
    answer = json.loads(
        grpc_predict(stubs, channel, "trio", {"data": payload}, token=server.key("inference")).prediction
    )
    assert answer["id"] == "grpc-1"
    assert_answers(
        v2_as_predictions(answer, TRIO_MEMBERS, TRIO_LABELS),
        labels_and_scores(expected_answers(test_store, "trio", images)),
    )


def test_grpc_from_8_clients(
    server: Server, test_store: Path, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel
) -> None:
    images = [image_bytes(400 + i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(
            pool.map(
                lambda image: grpc_predict(stubs, channel, "trio", {"data": image}, token=server.key("inference")),
                images,
            )
        )
    for reply, image in zip(replies, images, strict=True):
        assert_answers(json.loads(reply.prediction)["predictions"], expected_answers(test_store, "trio", [image]))


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param(
            {"data": b"not an image"},
            {
                "code": 400,
                "type": "InvalidImage",
                "message": "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)",
            },
            id="bad-image",
        ),
        pytest.param(
            {"image": b"x"},
            {
                "code": 400,
                "type": "RequestError",
                "message": (
                    "unknown parameter(s) ['image']; valid: policy, k, threshold, confidence, "
                    "early_exit, members, top_k, sequence, min_run, uncertainty, "
                    "deadline_ms, min_members, and the body (over gRPC "
                    "an input named body or data)"
                ),
            },
            id="wrong-input-name",
        ),
        pytest.param(
            {"data": json.dumps({"inputs": []}).encode()},
            {"error": "inputs must be a list of exactly one tensor object, got 0"},
            id="bad-v2",
        ),
    ],
)
def test_grpc_errors_arrive_as_status_ok_with_the_error_json(
    server: Server,
    stubs: tuple[ModuleType, ModuleType],
    channel: grpc.Channel,
    inputs: dict[str, bytes],
    expected: dict,
) -> None:
    """TorchServe's gRPC path drops per-request status codes: the call succeeds, the body carries the error."""
    assert (
        json.loads(grpc_predict(stubs, channel, "trio", inputs, token=server.key("inference")).prediction) == expected
    )


def test_grpc_unknown_model_is_internal(
    server: Server, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel
) -> None:
    """Unlike REST's 404, TorchServe 0.12 answers a gRPC call for an unregistered model with INTERNAL."""
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(stubs, channel, "nosuch", {"data": image_bytes(14)}, token=server.key("inference"))
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.INTERNAL,
        "Model not found: nosuch\norg.pytorch.serve.archive.model.ModelNotFoundException",
    )


def test_grpc_without_token_is_refused(
    server: Server, stubs: tuple[ModuleType, ModuleType], channel: grpc.Channel
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(stubs, channel, "trio", {"data": image_bytes(13)}, token=None)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# The Open Inference Protocol gateway, asked by tritonclient.http, on the same TorchServe.
TAGS_OUTPUTS = [
    ("labels", "BOOL", [-1, 2]),
    ("scores", "FP64", [-1, 2]),
    ("mobile.labels", "BOOL", [-1, 2]),
    ("mobile.scores", "FP64", [-1, 2]),
    ("pool_rgb.labels", "BOOL", [-1, 2]),
    ("pool_rgb.scores", "FP64", [-1, 2]),
    ("pool_gray.labels", "BOOL", [-1, 2]),
    ("pool_gray.scores", "FP64", [-1, 2]),
    ("missing", "BYTES", [-1]),
    ("partial", "BOOL", [-1]),
    ("skipped", "BYTES", [-1]),
    ("deferred", "BOOL", [-1]),
    ("entropy", "FP64", [-1, 2]),
    ("expected_entropy", "FP64", [-1, 2]),
    ("mutual_information", "FP64", [-1, 2]),
    ("vote_margin", "FP64", [-1, 2]),
]
VECTORS_OUTPUTS = [
    ("label", "BYTES", [-1]),
    ("scores", "FP64", [-1, 3]),
    ("top_labels", "BYTES", [-1, -1]),
    ("top_scores", "FP64", [-1, -1]),
    ("narrow.label", "BYTES", [-1]),
    ("narrow.scores", "FP64", [-1, 3]),
    ("wide.label", "BYTES", [-1]),
    ("wide.scores", "FP64", [-1, 3]),
    ("missing", "BYTES", [-1]),
    ("partial", "BOOL", [-1]),
    ("skipped", "BYTES", [-1]),
    ("deferred", "BOOL", [-1]),
    ("entropy", "FP64", [-1]),
    ("expected_entropy", "FP64", [-1]),
    ("mutual_information", "FP64", [-1]),
    ("vote_margin", "FP64", [-1]),
]


@pytest.fixture(scope="module")
def v2_client(server: Server) -> Iterator[triton.InferenceServerClient]:
    assert server.gateway is not None
    with triton_client(server.gateway) as client:
        yield client


@pytest.mark.parametrize(
    ("call", "args", "expected"),
    HEALTH_CALLS,
)
def test_tritonclient_health_through_the_gateway(
    server: Server, v2_client: triton.InferenceServerClient, call: str, args: tuple[str, ...], expected: bool
) -> None:
    assert getattr(v2_client, call)(*args, headers=server.headers("inference")) is expected


def test_tritonclient_server_metadata_through_the_gateway(
    server: Server, v2_client: triton.InferenceServerClient
) -> None:
    assert v2_client.get_server_metadata(headers=server.headers("inference")) == SERVER_METADATA


@pytest.mark.parametrize(
    ("name", "version", "expected"),
    [
        pytest.param("trio", "", model_metadata("trio", "2.1", IMAGES_INPUT, TRIO_OUTPUTS), id="image-multiclass"),
        pytest.param(
            "trio", "2.1", model_metadata("trio", "2.1", IMAGES_INPUT, TRIO_OUTPUTS), id="image-multiclass-by-version"
        ),
        pytest.param("tags", "", model_metadata("tags", "2.1", IMAGES_INPUT, TAGS_OUTPUTS), id="image-multilabel"),
        pytest.param(
            "vectors", "", model_metadata("vectors", "1.0", ("data", "FP32", [-1, 3, 4]), VECTORS_OUTPUTS), id="tensor"
        ),
    ],
)
def test_tritonclient_model_metadata_is_the_describes(
    server: Server, v2_client: triton.InferenceServerClient, name: str, version: str, expected: dict[str, Any]
) -> None:
    metadata = v2_client.get_model_metadata(name, version, headers=server.headers("inference"))
    assert metadata == expected
    described = requests.get(
        f"{server.management}/models/{name}?customized=true", headers=server.headers("management"), timeout=TIMEOUT
    )
    assert described.json()[0]["customizedMetadata"]["v2_metadata"] == {
        "inputs": metadata["inputs"],
        "outputs": metadata["outputs"],
    }


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        pytest.param("nosuch", "", "unknown model 'nosuch'; registered: tags, trio, vectors", id="unknown-model"),
        pytest.param(
            "trio", "9.9", "model 'trio' has version '2.1' (TorchServe's default), not '9.9'", id="unknown-version"
        ),
    ],
)
def test_tritonclient_metadata_of_an_unknown_model_is_404(
    server: Server, v2_client: triton.InferenceServerClient, name: str, version: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        v2_client.get_model_metadata(name, version, headers=server.headers("inference"))
    assert (caught.value.status(), caught.value.message()) == ("404", message)


def test_tritonclient_infer_through_the_gateway_is_torchserves_answer(
    server: Server, v2_client: triton.InferenceServerClient
) -> None:
    images = [image_bytes(31), image_bytes(32)]
    result = v2_client.infer(
        "trio",
        [triton_images(images)],
        request_id="gw-1",
        parameters={"policy": "majority"},
        headers=server.headers("inference"),
    )
    direct = post(server, "v2/models/trio/infer", v2_body(images, id="gw-1", parameters={"policy": "majority"}))
    assert direct.status_code == 200
    assert result.get_response() == direct.json()
    assert result.as_numpy("label").tolist() == v2_labels(direct.json())


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda server: {}, id="no-token"),
        pytest.param(lambda server: {"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param(lambda server: server.headers("management"), id="management-key"),
    ],
)
@pytest.mark.parametrize(
    "path",
    ["v2/health/live", "v2", "v2/models/trio", "v2/models/trio/ready"],
    ids=["live", "server-metadata", "model-metadata", "model-ready"],
)
def test_gateway_routes_want_the_inference_key(
    server: Server, headers: Callable[[Server], dict[str, str]], path: str
) -> None:
    response = requests.get(f"{server.gateway}/{path}", headers=headers(server), timeout=TIMEOUT)
    assert (response.status_code, response.json()) == (400, REFUSED)


def test_tritonclient_without_the_key_sees_no_live_server(v2_client: triton.InferenceServerClient) -> None:
    assert v2_client.is_server_live() is False


@pytest.mark.parametrize(
    ("path", "token"),
    [
        pytest.param("predictions/trio", True, id="predictions"),
        pytest.param("v1/models/trio:predict", True, id="v1"),
        pytest.param("predictions/trio", False, id="torchserves-token-refusal"),
        pytest.param("v2/models/nosuch/infer", True, id="torchserves-404"),
    ],
)
def test_gateway_relays_other_routes_to_torchserve(server: Server, path: str, token: bool) -> None:
    body = {"instances": [{"b64": base64.b64encode(image_bytes(33)).decode()}]}
    headers = server.headers("inference") if token else {}
    through, direct = (
        requests.post(f"{base}/{path}", json=body, headers=headers, timeout=TIMEOUT)
        for base in (server.gateway, server.inference)
    )
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    assert through.headers["Content-Type"] == direct.headers["Content-Type"]
    if not token:
        assert through.json() == TORCHSERVE_REFUSED


@pytest.mark.parametrize("expect", [True, False], ids=["expect-100-continue", "plain"])
def test_gateway_refuses_a_body_over_max_request_size_unread(server: Server, expect: bool) -> None:
    """Refused from the Content-Length alone: the client need not (and with Expect: 100-continue does not) send the
    body."""
    limit = int(server.setting("max_request_size"))
    assert server.gateway is not None
    host, port = server.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        connection.putrequest("POST", "/predictions/trio")
        connection.putheader("Content-Length", str(limit + 1))
        if expect:
            connection.putheader("Expect", "100-continue")
        connection.endheaders()
        response = connection.getresponse()
        answer = (response.status, json.loads(response.read()), response.getheader("Connection"))
    finally:
        connection.close()
    assert answer == (
        413,
        {"error": f"request body of {limit + 1} bytes is over TorchServe's max_request_size of {limit} bytes"},
        "close",
    )


def _second_gateway(server: Server, folder: Path) -> Server:
    """`server`'s config with the gateway moved to a free loopback port, and its own temp folder (pid files)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (folder / "tmp").mkdir(parents=True)
    config = folder / "config.properties"
    config.write_text(
        re.sub(
            r"(?m)^oip_gateway_address=.*$", f"oip_gateway_address=http://127.0.0.1:{port}", server.config.read_text()
        )
    )
    return Server(config=config, workdir=server.workdir, tmpdir=folder / "tmp")


def test_stop_gateway_leaves_no_process(server: Server, tmp_path: Path) -> None:
    second = _second_gateway(server, tmp_path)
    shutil.copyfile(server.torchserve_pid_file, second.torchserve_pid_file)
    start_gateway(second)
    pid = int(second.gateway_pid_file.read_text())
    ready = requests.get(f"{second.gateway}/v2/health/ready", headers=server.headers("inference"), timeout=TIMEOUT)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert stop_gateway(second) is True
    assert (psutil.pid_exists(pid), second.gateway_pid_file.exists()) == (False, False)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{second.gateway}/v2/health/live", timeout=TIMEOUT)


def test_gateway_exits_once_its_torchserve_is_gone(server: Server, tmp_path: Path) -> None:
    """A stand-in process plays TorchServe's frontend: when it ends, so does the gateway, within a couple of seconds."""
    second = _second_gateway(server, tmp_path)
    stand_in = subprocess.Popen(["sleep", "60"])
    command = [
        sys.executable,
        "-m",
        "gateway.open_inference",
        "--config",
        str(second.config),
        "--key-file",
        str(server.workdir / "key_file.json"),
    ]
    gateway = subprocess.Popen([*command, "--torchserve-pid", str(stand_in.pid)], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: _answers(f"{second.gateway}/v2/health/live", server.headers("inference")),
            "the gateway's answer",
            TIMEOUT,
            every_s=0.1,
        )
        stand_in.kill()
        stand_in.wait()
        began = time.monotonic()
        _, log = gateway.communicate(timeout=10)
        assert (gateway.returncode, time.monotonic() - began < 5) == (0, True)
        assert f"TorchServe (pid {stand_in.pid}) is gone; stopping" in log.decode()
    finally:
        stand_in.kill()
        stand_in.wait()
        if gateway.returncode is None:
            gateway.kill()
            gateway.communicate()


def _answers(url: str, headers: dict[str, str]) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_gateway_follows_a_rotated_inference_key(server: Server, v2_client: triton.InferenceServerClient) -> None:
    """TorchServe rewrites key_file.json on POST /token; the gateway takes the new key at once and refuses the old one.
    Last in this module: later requests would need the new key (every helper here reads the file anew)."""
    old = server.key("inference")
    rotated = requests.post(
        f"{server.management}/token", params={"type": "inference"}, headers=server.headers("API"), timeout=TIMEOUT
    )
    assert rotated.status_code == 200, rotated.text
    new = server.key("inference")
    assert new != old
    assert v2_client.is_server_ready(headers={"Authorization": f"Bearer {new}"}) is True
    assert v2_client.is_server_ready(headers={"Authorization": f"Bearer {old}"}) is False
