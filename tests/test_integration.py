"""Against a real TorchServe on 127.0.0.1: register with the real token, infer over REST, describe, unregister.

The server runs the shipped config.properties with only its ports and model store changed, in its
own folder and temp dir, so it never collides with one started by `make serve`. Every request loop
is bounded (a fixed number of requests, each with a timeout).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import geometric_mean
from urllib.parse import urlsplit

import numpy
import psutil
import pytest
import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop, unregister
from handlers.config.files import load_ensembles
from handlers.execution.plans import AUTO_PLANS
from handlers.inputs.images import batch_tensors, decode_image, to_tensor
from handlers.weights.checkpoints import read_checkpoint
from tests.checkpoint_layouts import CHEXNET_LABELS, chexnet
from tests.conftest import image_bytes, image_input, instances, npy_bytes, source_spec
from tests.fixture_reference import assert_answers, expected_answers
from tests.test_member_outputs import TASKS as OUTPUT_TASKS
from tests.test_member_outputs import expected_scores, write_members

pytestmark = pytest.mark.integration
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = private_server(tmp_path_factory.mktemp("torchserve"), test_store, port_offset=10100)
    try:
        start(instance, test_store)
        for name in ("trio", "pair", "tags", "vectors", "chexnet"):
            register(instance, name, workers=1)
        yield instance
    finally:
        stop(instance)


def predict(
    server: Server, name: str, *, path: str = "predictions", params: dict | None = None, **kwargs
) -> requests.Response:
    url = f"{server.inference}/{path}/{name}" if path == "predictions" else f"{server.inference}/models/{name}/invoke"
    headers = {**server.headers("inference"), **kwargs.pop("headers", {})}
    return requests.post(url, params=params, headers=headers, timeout=TIMEOUT, **kwargs)


def png(data: bytes) -> dict:
    return {"data": data, "headers": {"Content-Type": "image/png"}}


def listening(server: Server) -> set[tuple[str, int]]:
    """Every address the frontend, its workers and our gateway accept connections or datagrams on (read from
    /proc/net)."""
    frontend = psutil.Process(int(server.torchserve_pid_file.read_text()))
    processes = [frontend, *frontend.children(recursive=True), psutil.Process(int(server.gateway_pid_file.read_text()))]
    sockets = [s for process in processes for s in process.net_connections(kind="inet")]
    bound = [s.laddr for s in sockets if s.status == psutil.CONN_LISTEN or s.type == socket.SOCK_DGRAM]
    return {
        (ip.removeprefix("::ffff:"), port) for ip, port in bound
    }  # The JVM holds IPv4 addresses as IPv4-mapped IPv6.


def test_server_binds_loopback_and_uses_shipped_settings(server: Server) -> None:
    """CVE-2024-35199 bound gRPC to every interface: here each listener is one the config names, on loopback."""
    assert server.gateway is not None
    addresses = [server.inference, server.management, server.setting("metrics_address"), server.gateway]
    grpc_ports = [int(server.setting(key)) for key in ("grpc_inference_port", "grpc_management_port")]
    assert all(address.startswith("http://127.0.0.1:") for address in addresses)
    assert [server.setting("grpc_inference_address"), server.setting("grpc_management_address")] == [
        "127.0.0.1",
        "127.0.0.1",
    ]
    assert server.setting("allowed_urls") == "(?!)"
    expected = {("127.0.0.1", urlsplit(address).port) for address in addresses} | {
        ("127.0.0.1", port) for port in grpc_ports
    }
    assert len(expected) == 6
    assert listening(server) == expected


def test_registered_ensemble_describes_itself(server: Server) -> None:
    response = requests.get(
        f"{server.management}/models/trio",
        params={"customized": "true"},
        headers=server.headers("management"),
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    [model] = response.json()
    assert (model["modelVersion"], model["batchSize"], model["maxBatchDelay"]) == ("2.1", 8, 300)
    assert [w["status"] for w in model["workers"]] == ["READY"]
    custom = model["customizedMetadata"]
    assert isinstance(custom, dict), custom
    assert [m["name"] for m in custom["members"]] == ["mobile", "pool_rgb", "pool_gray"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", m["sha256"]) for m in custom["members"])
    assert custom["policies"] == ["all", "any", "cascade", "k_of_n", "majority", "max", "mean"]
    for member in custom["members"]:
        chosen = member["execution"]
        assert chosen["plan"] in AUTO_PLANS
        assert set(chosen["ms_per_call"]) == set(AUTO_PLANS)  # Every candidate was verified and timed in the worker.
        # describe rounds ms to 0.001: for plans under 0.1 ms per call (onnxruntime's PoolNets) that alone moves the
        # recomputed ratio by up to 2%, so it is compared relatively, with room for that rounding.
        assert chosen["speedup_vs_eager"] == pytest.approx(
            geometric_mean(
                [chosen["ms_per_call"]["eager"][s] / chosen["ms_per_call"][chosen["plan"]][s] for s in ("1", "4")]
            ),
            rel=0.03,
        )


@pytest.mark.parametrize("api", ["inference", "management"])
def test_requests_without_token_are_refused(server: Server, api: str) -> None:
    if api == "inference":
        response = requests.post(f"{server.inference}/predictions/trio", data=image_bytes(1), timeout=TIMEOUT)
    else:
        response = requests.get(f"{server.management}/models", timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["type"] == "InvalidKeyException"


def test_raw_image(server: Server, test_store: Path) -> None:
    response = predict(server, "trio", **png(image_bytes(11)))
    assert response.status_code == 200
    assert response.json()["policy"] == {"name": "mean", "params": {}}
    assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", [image_bytes(11)]))


def test_multipart_images_keep_part_order(server: Server, test_store: Path) -> None:
    images = [image_bytes(seed) for seed in (21, 22, 23)]
    files = [(f"image{i}", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = predict(server, "trio", files=files)
    assert response.status_code == 200
    assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", images))
    assert list(response.json()["members"]) == ["mobile", "pool_rgb", "pool_gray"]
    assert [len(labels) for labels in response.json()["members"].values()] == [3, 3, 3]


def test_multipart_repeated_name_is_refused(server: Server) -> None:
    files = [("image", ("a.png", image_bytes(31), "image/png")), ("image", ("b.png", image_bytes(32), "image/png"))]
    response = predict(server, "trio", files=files)
    assert response.status_code == 400
    assert response.json()["message"].startswith("multipart body is larger than its parts: part names must be distinct")


def test_json_instances(server: Server, test_store: Path) -> None:
    images = [image_bytes(41), image_bytes(42, fmt="JPEG")]
    body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in images]}
    response = predict(server, "tags", json=body)
    assert response.status_code == 200
    assert_answers(response.json()["predictions"], expected_answers(test_store, "tags", images))


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        pytest.param("application/x-npy", npy_bytes, id="npy"),
        pytest.param("application/json", lambda values: json.dumps({"instances": values.tolist()}).encode(), id="json"),
    ],
)
def test_tensor_instances(
    server: Server, test_store: Path, content_type: str, encode: Callable[[numpy.ndarray], bytes]
) -> None:
    values = instances(81, 4)
    response = predict(server, "vectors", data=encode(values), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert_answers(response.json()["predictions"], expected_answers(test_store, "vectors", values))


def test_image_sent_to_a_tensor_ensemble_is_415(server: Server) -> None:
    response = predict(server, "vectors", **png(image_bytes(82)))
    assert response.status_code == 415
    assert response.json()["type"] == "UnsupportedMediaType"


@pytest.mark.parametrize(
    ("how", "policy"),
    [
        pytest.param("query", {"policy": "k_of_n", "k": "3", "threshold": "0.4"}, id="invoke-query"),
        pytest.param("headers", {"policy": "any", "threshold": "0.25"}, id="predictions-headers"),
        pytest.param("form", {"policy": "all"}, id="multipart-fields"),
    ],
)
def test_per_request_policy(server: Server, test_store: Path, how: str, policy: dict[str, str]) -> None:
    images = [image_bytes(51), image_bytes(52)]
    if how == "query":
        response = predict(server, "pair", path="invoke", params=policy, files=[("a", images[0]), ("b", images[1])])
    elif how == "headers":
        headers = {f"X-Ensemble-{key.title()}": value for key, value in policy.items()}
        response = predict(server, "pair", files=[("a", images[0]), ("b", images[1])], headers=headers)
    else:
        response = predict(server, "pair", files=[("a", images[0]), ("b", images[1])], data=policy)
    assert response.status_code == 200, response.text
    expected_params = {k: (int(v) if k == "k" else float(v)) for k, v in policy.items() if k != "policy"}
    assert response.json()["policy"] == {"name": policy["policy"], "params": {"threshold": 0.5, **expected_params}}
    assert_answers(response.json()["predictions"], expected_answers(test_store, "pair", images, **policy))


@pytest.mark.parametrize("how", ["invoke-query", "headers"])
def test_early_exit_gives_the_exhaustive_labels_and_says_what_ran(server: Server, test_store: Path, how: str) -> None:
    images = [image_bytes(seed) for seed in (55, 56, 57, 58)]
    files = [(f"i{i}", image) for i, image in enumerate(images)]
    early = {"policy": "any", "early_exit": "true", "uncertainty": "true"}
    if how == "headers":
        headers = {f"X-Ensemble-{key.replace('_', '-').title()}": value for key, value in early.items()}
        response = predict(server, "pair", files=files, headers=headers)
    else:
        response = predict(server, "pair", path="invoke", params=early, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["policy"] == {"name": "any", "params": {"threshold": 0.5, "early_exit": True}}
    exhaustive = expected_answers(test_store, "pair", images, policy="any")
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in exhaustive]
    for prediction, image in zip(body["predictions"], images, strict=True):
        assert prediction["early_exit"] is True
        assert sorted([*prediction["members"], *prediction["skipped"]]) == ["mobile", "pool_gray", "pool_rgb"]
        if prediction["label"] == "absent":  # Under any, a no needs every member's no.
            assert prediction["skipped"] == []
        # Scores and uncertainty are over the members that ran (docs/policies.md, Early exit).
        [over_those_that_ran] = expected_answers(
            test_store, "pair", [image], policy="any", uncertainty="true", members=",".join(prediction["members"])
        )
        assert_answers(
            [{k: v for k, v in prediction.items() if k not in ("skipped", "early_exit")}], [over_those_that_ran]
        )
    refused = predict(server, "pair", path="invoke", params={"policy": "mean", "early_exit": "true"}, files=files[:1])
    assert refused.status_code == 400
    assert "early_exit cannot be exact for policy 'mean'" in refused.json()["message"]


def test_members_and_top_k_in_the_invoke_query(server: Server, test_store: Path) -> None:
    images = [image_bytes(53), image_bytes(54)]
    params = {"members": "pool_gray,mobile", "policy": "all", "top_k": "2"}
    response = predict(server, "trio", path="invoke", params=params, files=[("a", images[0]), ("b", images[1])])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answered_by"] == ["mobile", "pool_gray"]
    assert list(body["provenance"]["member_sha256"]) == ["mobile", "pool_gray"]
    assert [len(p["top"]) for p in body["predictions"]] == [2, 2]
    assert_answers(body["predictions"], expected_answers(test_store, "trio", images, **params))


def test_unknown_policy_lists_valid_names(server: Server) -> None:
    response = predict(server, "pair", path="invoke", params={"policy": "vote"}, **png(image_bytes(61)))
    assert response.status_code == 400
    assert response.json() == {
        "code": 400,
        "type": "InvalidPolicy",
        "message": "unknown policy 'vote'; valid policies: all, any, cascade, k_of_n, majority, max, mean",
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            {"files": [("a", image_bytes(62))]},
            "unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); valid: policy, k, threshold, "
            "confidence, early_exit, members, top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members; an image part must hold an "
            "image's bytes ('polcy' holds 3 bytes of text)",
            id="multipart",
        ),
        pytest.param(
            png(image_bytes(62)),
            "unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); valid: policy, k, threshold, "
            "confidence, early_exit, members, top_k, sequence, min_run, uncertainty, "
            "deadline_ms, min_members, and the body (over gRPC an "
            "input named body or data)",
            id="raw-body",
        ),
    ],
)
def test_a_misspelt_query_parameter_is_named_as_one(server: Server, body: dict, message: str) -> None:
    response = predict(server, "pair", path="invoke", params={"polcy": "any"}, **body)
    assert (response.status_code, response.json()) == (400, {"code": 400, "type": "RequestError", "message": message})


def test_concurrent_requests_are_batched_and_split_back(server: Server, test_store: Path) -> None:
    """8 requests carrying 1..4 images each, sent at once: TorchServe batches them; each gets its own results."""
    payloads = [[image_bytes(100 * r + i) for i in range(1 + r % 4)] for r in range(8)]

    def send(images: list[bytes]) -> requests.Response:
        return predict(server, "trio", files=[(f"p{i}", data) for i, data in enumerate(images)])

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, payloads))
    assert [r.status_code for r in responses] == [200] * 8
    for response, images in zip(responses, payloads, strict=True):
        assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", images))
    batch_sizes = [int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses]
    assert max(batch_sizes) >= 2, f"TorchServe did not batch any requests together: {batch_sizes}"


def test_bad_input_fails_alone_inside_a_batch(server: Server, test_store: Path) -> None:
    """Good and bad requests that TorchServe batched together: only the bad ones fail; the worker stays."""
    pid = worker_pid(server, "trio")
    good = [image_bytes(200 + i) for i in range(4)]
    bad = [
        ({"data": b"GIF89a-not-really", "headers": {"Content-Type": "image/gif"}}, 400, "InvalidImage"),
        ({"json": {"instances": [{"b64": "%%%"}]}}, 400, "InvalidImage"),
        ({"json": {"instances": [{"b64": base64.b64encode(good[0]).decode()}] * 65}}, 413, "PayloadTooLarge"),
        ({"data": good[0], "headers": {"Content-Type": "image/png", "X-Ensemble-K": "2"}}, 400, "InvalidPolicy"),
    ]
    jobs = [png(data) for data in good] + [kwargs for kwargs, _, _ in bad]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(lambda kwargs: predict(server, "trio", **kwargs), jobs))
    for response, data in zip(responses[: len(good)], good, strict=True):
        assert response.status_code == 200
        assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", [data]))
    assert [(r.status_code, r.json()["type"]) for r in responses[len(good) :]] == [(s, t) for _, s, t in bad]
    assert max(int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses[len(good) :]) >= 2
    assert worker_pid(server, "trio") == pid
    assert predict(server, "trio", **png(good[1])).status_code == 200


def test_chexnet_checkpoint_is_served_with_its_own_weights(server: Server, test_store: Path) -> None:
    """CheXNet's published layout, remapped by state_dict: rules at build: each served score is the original module's.

    Strict loading alone proves every key found a tensor of the right shape; equal outputs prove each
    tensor went to its own place (the test module's normalisation layers all differ).
    """
    path = test_store.parent / "src" / "chexnet" / "chexnet.pth.tar"
    assert not zipfile.is_zipfile(path), "saved in PyTorch 0.3's legacy format"
    source = read_checkpoint(path)
    assert set(source) == {"epoch", "arch", "best_loss", "state_dict"}
    assert {
        "module.densenet121.features.denseblock1.denselayer1.norm.1.weight",
        "module.densenet121.classifier.0.weight",
    } <= set(source["state_dict"])
    assert not [key for key in source["state_dict"] if key.endswith("num_batches_tracked")], (
        "saved before PyTorch 0.4.1"
    )
    described = requests.get(
        f"{server.management}/models/chexnet",
        params={"customized": "true"},
        headers=server.headers("management"),
        timeout=TIMEOUT,
    ).json()[0]["customizedMetadata"]
    assert described["members"][0]["source"]["filled"] == {"num_batches_tracked": 121}
    images = [image_bytes(seed, size=(80, 72)) for seed in (301, 302, 303)]
    response = predict(server, "chexnet", files=[(f"x{i}", data) for i, data in enumerate(images)])
    assert response.status_code == 200, response.text
    spec = source_spec(test_store, "chexnet")
    inputs = torch.stack([to_tensor(decode_image(data, spec.limits), image_input(spec.input)) for data in images])
    with torch.inference_mode():
        expected = chexnet()(inputs)
    served = torch.tensor(
        [[p["members"]["chexnet"]["scores"][label] for label in CHEXNET_LABELS] for p in response.json()["predictions"]]
    )
    assert served.shape == (3, 14)
    assert (served - expected).abs().max().item() <= 1e-4
    assert (expected.max(dim=0).values - expected.min(dim=0).values).min().item() > 1e-3, (
        "images must score differently"
    )


def test_unregister(server: Server) -> None:
    assert predict(server, "tags", **png(image_bytes(71))).status_code == 200
    unregister(server, "tags")
    response = predict(server, "tags", **png(image_bytes(71)))
    assert response.status_code == 404
    register(server, "tags", workers=1)
    assert predict(server, "tags", **png(image_bytes(71))).status_code == 200


def worker_pid(server: Server, name: str) -> int:
    response = requests.get(f"{server.management}/models/{name}", headers=server.headers("management"), timeout=TIMEOUT)
    [worker] = response.json()[0]["workers"]
    return int(worker["pid"])


def test_logs_go_once_to_their_own_files_without_debug(server: Server) -> None:
    """archive_scripts/log4j2.xml: access lines in access_log only, no DEBUG frontend lines, no duplicates."""
    before = len((server.workdir / "logs" / "access_log.log").read_text().splitlines())
    for seed in (91, 92, 93):
        assert predict(server, "trio", **png(image_bytes(seed))).status_code == 200
    logs = server.workdir / "logs"
    access = (logs / "access_log.log").read_text().splitlines()
    ts_log = (logs / "ts_log.log").read_text()
    assert len(access) - before == 3
    assert "[DEBUG]" not in ts_log
    assert "POST /predictions/trio" not in ts_log


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_members_with_structured_outputs_and_their_own_labels_answer_on_torchserve(
    server: Server, test_store: Path, tmp_path: Path, task: str
) -> None:
    """Tuple, dict, dataclass, nested and [N, C, 1, 1] outputs, reordered labels, extra ones and (multilabel) some
    labels only, through the real TorchServe: every member's scores are its own module's, on the ensemble's labels."""
    labels, members, policy = OUTPUT_TASKS[task]
    path, modules = write_members(tmp_path / "src", task, members, labels, policy)
    spec = load_ensembles(path)[task]
    build_archive(spec, test_store)
    register(server, task, workers=1)
    try:
        images = [image_bytes(seed, size=(31, 26)) for seed in (21, 22)]
        shared = image_input(spec.input)
        rows = batch_tensors([decode_image(data, spec.limits) for data in images], [shared])[shared]
        for image, row in zip(images, rows, strict=True):
            response = predict(
                server,
                task,
                data=image,
                headers={"Content-Type": "image/png", "X-Ensemble-Top-K": "3"}
                if task == "multiclass"
                else {"Content-Type": "image/png"},
            )
            assert response.status_code == 200, response.text
            answer = response.json()["predictions"][0]["members"]
            for name, (_, own, output) in members.items():
                with torch.inference_mode():
                    [want] = expected_scores(modules[name], row[None], task, own or labels, labels, output)
                served = (
                    answer[name]["scores"]
                    if task == "multilabel"
                    else {entry["label"]: entry["score"] for entry in answer[name]["top"]}
                )
                assert served == pytest.approx(want, abs=1e-4)
    finally:
        unregister(server, task)
