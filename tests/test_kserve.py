"""The KServe storage layout (`make kserve`), served by TorchServe as KServe's TorchServe runtime starts it.

TorchServe runs the layout's own config.properties with only its listeners moved to free loopback
ports, gets the layout's model-store on its command line (as the runtime passes it), sends no token,
and registers nothing: the ensemble is loaded at start from the config's model_snapshot. Every
request loop is bounded (a fixed number of requests, each with a timeout).
"""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import grpc
import pytest
import requests
import tritonclient.http as triton
import yaml
from prometheus_client.parser import text_string_to_metric_families

from archive_scripts.kserve_export import PROFILE, export
from archive_scripts.torchserve_ctl import READY_TIMEOUT_S, Server, start, stop
from archive_scripts.waiting import wait_for
from handlers.config.files import load_ensembles, read_properties
from handlers.errors import ConfigError
from tests.conftest import image_bytes, source_spec
from tests.fixture_reference import assert_answers, expected_answers, labels_and_scores
from tests.protocol_clients import (
    HEALTH_CALLS,
    IMAGES_INPUT,
    SERVER_METADATA,
    TRIO_OUTPUTS,
    generate,
    grpc_predict,
    model_metadata,
    triton_client,
    triton_images,
    v2_as_predictions,
    v2_body,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
INFERENCE_SERVICE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
SERVING_RUNTIME = ROOT / "deploy" / "kserve" / "servingruntime.yaml"
# Where KServe's storage initializer puts the InferenceService's storageUri: the layout's root.
MOUNT = PurePosixPath("/mnt/models")
# The KServe wrapper in pytorch/torchserve-kfs 0.12.0 (kserve_wrapper/__main__.py) serves HTTP on 8080, gRPC on 8081.
WRAPPER_PORTS = {8080, 8081}
TIMEOUT = 60
# Port shifts tried for the test's listeners, away from test_integration's (10100) and the benchmarks'.
OFFSETS = range(10400, 10600, 20)
TRIO_MEMBERS = ["mobile", "pool_rgb", "pool_gray"]
TRIO_LABELS = ["cat", "dog", "fox"]
TRIO_SNAPSHOT = {
    "name": "startup.cfg",
    "modelCount": 1,
    "models": {
        "trio": {
            "2.1": {
                "defaultVersion": True,
                "marName": "trio.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 8,
                "maxBatchDelay": 300,
                "responseTimeout": 60,
            }
        }
    },
}


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def loopback_config(config: Path, into: Path) -> Path:
    """A copy of `config` whose listeners are on 127.0.0.1, shifted to free ports, and whose metrics config is
    read from the layout (the pod's /mnt/models); nothing else changes."""
    settings = read_properties(config)
    listeners = {key: value for key, value in settings.items() if key.endswith(("_address", "_port"))}
    found = {key: re.fullmatch(r"(?:.*:)?(\d+)", value) for key, value in listeners.items()}
    ports = {key: int(match.group(1)) for key, match in found.items() if match}
    offset = next((o for o in OFFSETS if all(_port_is_free(port + o) for port in set(ports.values()))), None)
    if offset is None:
        pytest.fail(f"no free ports for {sorted(set(ports.values()))} shifted by any of {list(OFFSETS)}")

    def moved(line: re.Match[str]) -> str:
        key = line.group(1)
        if key.endswith("_port"):
            return f"{key}={ports[key] + offset}"
        return f"{key}=http://127.0.0.1:{ports[key] + offset}"

    text = re.sub(rf"(?m)^({'|'.join(map(re.escape, ports))})=.*$", moved, config.read_text())
    text = text.replace("metrics_config=/mnt/models/", f"metrics_config={config.parent.parent}/")
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.properties").write_text(text)
    return into / "config.properties"


def describe(server: Server, name: str) -> requests.Response:
    return requests.get(f"{server.management}/models/{name}", timeout=TIMEOUT)


def listed_models(server: Server) -> list[str]:
    return [
        model["modelName"] for model in requests.get(f"{server.management}/models", timeout=TIMEOUT).json()["models"]
    ]


def post_image(server: Server, seed: int) -> requests.Response:
    """One raw PNG to TorchServe's own predictions path, with no token."""
    headers = {"Content-Type": "image/png"}
    return requests.post(
        f"{server.inference}/predictions/trio", data=image_bytes(seed), headers=headers, timeout=TIMEOUT
    )


def wait_until_ready(server: Server, name: str) -> None:
    """Wait for a READY worker: TorchServe registers the snapshot's models before /ping answers, but their workers load
    after."""

    def ready() -> bool:
        response = describe(server, name)
        return response.ok and any(worker["status"] == "READY" for worker in response.json()[0]["workers"])

    wait_for(ready, f"a READY worker of {name} (see {server.workdir / 'logs'})", READY_TIMEOUT_S, every_s=0.5)


@pytest.fixture(scope="module")
def kserve_server(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """TorchServe started from the exported layout of trio, with trio READY; yields (server, layout folder)."""
    root = tmp_path_factory.mktemp("kserve")
    layout = export(source_spec(test_store, "trio"), test_store, root / "layouts")
    workdir = root / "torchserve"
    config = loopback_config(layout / "config" / "config.properties", workdir)
    server = Server(config=config, workdir=workdir, tmpdir=workdir / "tmp")
    try:
        start(server, layout / "model-store")
        wait_until_ready(server, "trio")
        yield server, layout
    finally:
        stop(server)


def test_layout_holds_the_config_and_the_archive_only(kserve_server: tuple[Server, Path], test_store: Path) -> None:
    _, layout = kserve_server
    assert sorted(str(p.relative_to(layout)) for p in layout.rglob("*") if p.is_file()) == [
        "config/config.properties",
        "config/metrics.yaml",
        "model-store/trio.mar",
    ]
    assert (layout / "model-store" / "trio.mar").read_bytes() == (test_store / "trio.mar").read_bytes()


def test_layout_config_is_the_profile_with_trios_snapshot(kserve_server: tuple[Server, Path]) -> None:
    _, layout = kserve_server
    config = (layout / "config" / "config.properties").read_text().splitlines()
    profile = PROFILE.read_text().splitlines()
    [snapshot_line] = [line for line in config if line.startswith("model_snapshot=")]
    [template_line] = [line for line in profile if line.startswith("model_snapshot=")]
    assert [template_line if line == snapshot_line else line for line in config] == profile
    assert json.loads(snapshot_line.removeprefix("model_snapshot=")) == TRIO_SNAPSHOT


def test_served_config_moves_only_the_listeners(kserve_server: tuple[Server, Path]) -> None:
    server, layout = kserve_server
    served = read_properties(server.config)
    shipped = read_properties(layout / "config" / "config.properties")
    listeners = {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_port",
        "grpc_management_port",
        "oip_gateway_address",
    }
    assert {key for key in shipped if served[key] != shipped[key]} == listeners | {"metrics_config"}
    assert Path(served["metrics_config"]) == layout / "config" / "metrics.yaml"
    assert served["inference_address"] == served["management_address"]
    assert all(
        served[key].startswith("http://127.0.0.1:")
        for key in ("inference_address", "metrics_address", "oip_gateway_address")
    )


def test_snapshot_registered_trio_with_its_batching(kserve_server: tuple[Server, Path]) -> None:
    server, _ = kserve_server
    model = describe(server, "trio").json()[0]
    assert (model["modelVersion"], model["batchSize"], model["maxBatchDelay"]) == ("2.1", 8, 300)
    assert (model["minWorkers"], model["maxWorkers"], model["responseTimeout"]) == (1, 1, 60)
    assert [worker["status"] for worker in model["workers"]] == ["READY"]
    assert listed_models(server) == ["trio"]


def test_kserve_v1_predict(kserve_server: tuple[Server, Path], test_store: Path) -> None:
    server, _ = kserve_server
    images = [image_bytes(seed) for seed in (501, 502, 503)]
    body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in images]}
    response = requests.post(f"{server.inference}/v1/models/trio:predict", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", images))


def test_concurrent_raw_images_are_batched(kserve_server: tuple[Server, Path], test_store: Path) -> None:
    server, _ = kserve_server
    seeds = list(range(600, 624))
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda seed: post_image(server, seed), seeds))
    assert [r.status_code for r in responses] == [200] * len(seeds)
    for response, seed in zip(responses, seeds, strict=True):
        assert_answers(response.json()["predictions"], expected_answers(test_store, "trio", [image_bytes(seed)]))
    batch_sizes = [int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses]
    assert 2 <= max(batch_sizes) <= 8, batch_sizes


@pytest.mark.parametrize(
    "path", ["predictions/trio", "v2/models/trio/infer"], ids=["as-kserve-wrapper-forwards", "v2-route"]
)
def test_v2_requests_of_several_images_from_8_clients(
    kserve_server: tuple[Server, Path], test_store: Path, path: str
) -> None:
    """The wrapper forwards a v2 body to /predictions/<name>; 16 requests of 1..4 images from 8 clients, no token."""
    server, _ = kserve_server
    payloads = [[image_bytes(800 + 10 * r + i) for i in range(1 + r % 4)] for r in range(16)]

    def send(images: list[bytes]) -> requests.Response:
        return requests.post(f"{server.inference}/{path}", json=v2_body(images, id=f"n{len(images)}"), timeout=TIMEOUT)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, payloads))
    assert [r.status_code for r in responses] == [200] * len(payloads)
    for response, images in zip(responses, payloads, strict=True):
        body = response.json()
        assert (body["model_name"], body["id"]) == ("trio", f"n{len(images)}")
        assert_answers(
            v2_as_predictions(body, TRIO_MEMBERS, TRIO_LABELS),
            labels_and_scores(expected_answers(test_store, "trio", images)),
        )
    assert max(int(r.headers["X-Ensemble-Batch-Requests"]) for r in responses) >= 2


def test_grpc_as_the_kserve_wrapper_sends_it(
    kserve_server: tuple[Server, Path], test_store: Path, tmp_path: Path
) -> None:
    """gRPC-v2 through the wrapper is TorchServe's Predictions with the v2 JSON under `data`; raw images work too."""
    server, _ = kserve_server
    stubs = generate(tmp_path / "stubs")
    v2_images = [[image_bytes(900 + 10 * r + i) for i in range(1 + r % 3)] for r in range(8)]
    raw_images = [image_bytes(950 + r) for r in range(8)]
    calls = [{"data": json.dumps(v2_body(images)).encode()} for images in v2_images] + [
        {"data": image} for image in raw_images
    ]
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.setting('grpc_inference_port')}") as channel,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = [
            json.loads(reply.prediction)
            for reply in pool.map(lambda inputs: grpc_predict(stubs, channel, "trio", inputs, token=None), calls)
        ]
    for answer, images in zip(answers[:8], v2_images, strict=True):
        assert_answers(
            v2_as_predictions(answer, TRIO_MEMBERS, TRIO_LABELS),
            labels_and_scores(expected_answers(test_store, "trio", images)),
        )
    for answer, image in zip(answers[8:], raw_images, strict=True):
        assert_answers(answer["predictions"], expected_answers(test_store, "trio", [image]))


@pytest.mark.parametrize(
    ("method", "path", "params", "status"),
    [
        pytest.param("POST", "models", {"url": "trio.mar", "model_name": "again"}, 405, id="register-refused"),
        pytest.param("DELETE", "models/trio", {}, 405, id="unregister-refused"),
        # enable_model_api=false leaves scaling open (SECURITY.md): asking for the current worker count changes nothing.
        pytest.param("PUT", "models/trio", {"min_worker": "1", "max_worker": "1"}, 202, id="scale-still-answers"),
        pytest.param("GET", "models/trio", {}, 200, id="describe-answers"),
        pytest.param("GET", "models", {}, 200, id="list-answers"),
    ],
)
def test_model_api_is_off_and_tokens_are_not_needed(
    kserve_server: tuple[Server, Path], method: str, path: str, params: dict[str, str], status: int
) -> None:
    server, _ = kserve_server
    response = requests.request(method, f"{server.management}/{path}", params=params, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    assert listed_models(server) == ["trio"]


def test_metrics_answer_in_prometheus_format(kserve_server: tuple[Server, Path]) -> None:
    server, _ = kserve_server
    assert post_image(server, 700).status_code == 200
    response = requests.get(f"{server.setting('metrics_address')}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]

    def values(name: str, labels: dict[str, str]) -> list[float]:
        """The values of `name`'s samples with these labels (and any hostname label, which names this machine)."""
        return [
            s.value
            for s in samples
            if s.name == name and {k: v for k, v in s.labels.items() if k.lower() != "hostname"} == labels
        ]

    [requests_total] = values("ts_inference_requests_total", {"model_name": "trio", "model_version": "default"})
    assert requests_total >= 1
    # The layout's metrics.yaml declares the ensemble's counters.
    [batches] = values("ensemble_batches_total", {"ModelName": "trio", "Level": "Model"})
    assert batches >= 1


@pytest.fixture(scope="module")
def v2_client(kserve_server: tuple[Server, Path]) -> Iterator[triton.InferenceServerClient]:
    """tritonclient.http on the Open Inference Protocol gateway `start` ran next to this TorchServe; no token."""
    gateway = kserve_server[0].gateway
    assert gateway is not None
    with triton_client(gateway) as client:
        yield client


@pytest.mark.parametrize(
    ("call", "args", "expected"),
    HEALTH_CALLS,
)
def test_tritonclient_health_through_the_gateway_without_a_token(
    v2_client: triton.InferenceServerClient, call: str, args: tuple[str, ...], expected: bool
) -> None:
    assert getattr(v2_client, call)(*args) is expected


def test_tritonclient_metadata_through_the_gateway(v2_client: triton.InferenceServerClient) -> None:
    """Both APIs share TorchServe's port here, where it has no per-version describe route: the version is checked by the
    gateway."""
    expected = model_metadata("trio", "2.1", IMAGES_INPUT, TRIO_OUTPUTS)
    assert v2_client.get_server_metadata() == SERVER_METADATA
    assert (v2_client.get_model_metadata("trio"), v2_client.get_model_metadata("trio", "2.1")) == (expected, expected)


def test_tritonclient_infer_through_the_gateway_is_torchserves_answer(
    kserve_server: tuple[Server, Path], v2_client: triton.InferenceServerClient
) -> None:
    server, _ = kserve_server
    images = [image_bytes(990), image_bytes(991), image_bytes(992)]
    result = v2_client.infer("trio", [triton_images(images)], request_id="kserve-gw")
    direct = requests.post(
        f"{server.inference}/v2/models/trio/infer", json=v2_body(images, id="kserve-gw"), timeout=TIMEOUT
    )
    assert direct.status_code == 200
    assert result.get_response() == direct.json()


def test_export_refuses_an_archive_built_with_other_batching(test_store: Path, tmp_path: Path) -> None:
    spec = source_spec(test_store, "trio")
    changed = replace(spec, batching=replace(spec.batching, batch_size=4))
    with pytest.raises(ConfigError, match=r"trio\.mar was built as version 2\.1 with .*'batchSize': 8.*rebuild it"):
        export(changed, test_store, tmp_path)
    assert not (tmp_path / "trio").exists()


def inference_service() -> dict:
    return yaml.safe_load(INFERENCE_SERVICE.read_text())


def test_inference_service_serves_the_layout_over_v2() -> None:
    service = inference_service()
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert service["metadata"]["name"] == "shapes"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "pytorch"}
    assert model["protocolVersion"] == "v2"
    assert re.fullmatch(r"(s3|gs|pvc)://.+/shapes", model["storageUri"])
    assert model["resources"] == {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("minReplicas", 1, id="min-replicas"),
        pytest.param("maxReplicas", 4, id="max-replicas"),
        pytest.param("scaleMetric", "concurrency", id="scale-metric"),
        pytest.param("scaleTarget", 2, id="scale-target"),
        pytest.param("containerConcurrency", 2, id="container-concurrency"),
    ],
)
def test_inference_service_scaling(field: str, value: object) -> None:
    assert inference_service()["spec"]["predictor"][field] == value


def test_container_concurrency_fills_every_workers_batch() -> None:
    batching = load_ensembles(ROOT / "ensembles.yaml", check_files=False)["shapes"].batching
    assert inference_service()["spec"]["predictor"]["containerConcurrency"] == batching.workers * batching.batch_size


def serving_runtime() -> dict:
    return yaml.safe_load(SERVING_RUNTIME.read_text())


def runtime_container() -> dict:
    [container] = serving_runtime()["spec"]["containers"]
    return container


def pinned(package: str) -> str:
    """The version requirements.txt pins `package` to."""
    [line] = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith(f"{package}==")]
    return line.removeprefix(f"{package}==")


def listeners(config: dict[str, str]) -> dict[str, tuple[str | None, int | None]]:
    """Every listener a config.properties sets up, as (host, port); every address or port key is one of them."""
    found = {
        key.removesuffix("_address"): (urlsplit(value).hostname, urlsplit(value).port)
        for key, value in config.items()
        if key.endswith("_address") and "://" in value
    }
    for api in ("grpc_inference", "grpc_management"):
        found[api] = (config[f"{api}_address"], int(config[f"{api}_port"]))
    named = {key for key in config if key.endswith(("_address", "_port"))}
    assert named == {f"{key}_address" for key in found} | {"grpc_inference_port", "grpc_management_port"}, named
    return found


def test_inference_service_names_our_runtime() -> None:
    """KServe's built-in TorchServe runtime is going away: the InferenceService must select ours by name."""
    runtime = serving_runtime()
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert runtime["metadata"]["name"] == "ensemble-torchserve"
    assert inference_service()["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]


def test_runtime_serves_the_inference_services_format_and_protocol() -> None:
    """KServe refuses a runtime that lacks the model's format or protocol; the wrapper must speak that protocol too."""
    spec, model = serving_runtime()["spec"], inference_service()["spec"]["predictor"]["model"]
    assert spec["supportedModelFormats"] == [
        {"name": model["modelFormat"]["name"], "version": "1", "autoSelect": False}
    ]
    assert spec["protocolVersions"] == [model["protocolVersion"]] == ["v2"]
    env = {variable["name"]: variable["value"] for variable in runtime_container()["env"]}
    assert env == {"PROTOCOL_VERSION": "v2", "CONFIG_PATH": "/mnt/models/config/config.properties"}


def test_runtime_image_is_the_pinned_torchserve() -> None:
    """The pod runs the TorchServe the tests run: SECURITY.md's CVE table is written for this version."""
    assert pinned("torchserve") == version("torchserve") == "0.12.0"
    assert runtime_container()["image"] == f"pytorch/torchserve-kfs:{pinned('torchserve')}"


def test_runtime_starts_torchserve_on_the_exported_layout(test_store: Path, tmp_path: Path) -> None:
    """Every path the runtime hands TorchServe and the wrapper is one `make kserve` writes, once mounted at
    /mnt/models."""
    layout = export(source_spec(test_store, "trio"), test_store, tmp_path)
    container = runtime_container()
    command, start_flag, *options = container["args"]
    assert (command, start_flag) == ("torchserve", "--start")
    paths = dict(option.removeprefix("--").split("=", 1) for option in options)
    assert paths == {"model-store": "/mnt/models/model-store", "ts-config": "/mnt/models/config/config.properties"}
    on_disk = {name: layout / PurePosixPath(path).relative_to(MOUNT) for name, path in paths.items()}
    assert sorted(archive.name for archive in on_disk["model-store"].iterdir()) == ["trio.mar"]
    config = read_properties(on_disk["ts-config"])
    assert config["model_store"] == paths["model-store"]
    assert (layout / PurePosixPath(config["metrics_config"]).relative_to(MOUNT)).is_file()
    assert {variable["name"]: variable["value"] for variable in container["env"]}["CONFIG_PATH"] == paths["ts-config"]


def test_only_the_scraped_metrics_listener_leaves_loopback() -> None:
    """In the pod, TorchServe's APIs stay on loopback behind the wrapper; only the metrics port Prometheus scrapes is
    open."""
    found = listeners(read_properties(PROFILE))
    assert found == {
        "inference": ("127.0.0.1", 8085),
        "management": ("127.0.0.1", 8085),
        "metrics": ("0.0.0.0", 8082),
        "oip_gateway": ("127.0.0.1", 8083),
        "grpc_inference": ("127.0.0.1", 7070),
        "grpc_management": ("127.0.0.1", 7071),
    }
    annotations = serving_runtime()["spec"]["annotations"]
    assert annotations == {"prometheus.kserve.io/port": "8082", "prometheus.kserve.io/path": "/metrics"}
    open_to_pod = {(host, port) for host, port in found.values() if host != "127.0.0.1"}
    assert open_to_pod == {("0.0.0.0", int(annotations["prometheus.kserve.io/port"]))}
    assert {port for _, port in found.values()}.isdisjoint(WRAPPER_PORTS)
    assert runtime_container()["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]


def test_runtime_runs_unprivileged_with_guaranteed_resources() -> None:
    container = runtime_container()
    assert container["securityContext"] == {
        "runAsUser": 1000,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi"},
        "limits": {"cpu": "2", "memory": "3Gi"},
    }
