"""The settings SECURITY.md promises, checked against the shipped config.properties, the KServe profile and the handler
source.

The tests marked integration ask a real TorchServe, running the shipped config with no model registered,
to do what each published TorchServe CVE abused (SECURITY.md, "Published TorchServe vulnerabilities"),
with the real management key, and check that it refuses and that nothing was fetched, written or built.
"""

from __future__ import annotations

import ast
import json
import re
import threading
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests
import ts

from archive_scripts.torchserve_ctl import Server, private_server, start, stop
from handlers.config.files import read_properties

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 8 * 1024 * 1024
TIMEOUT = 60
FRONTEND_JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
# Away from the other test servers' port shifts (test_integration 10100, test_kserve 10400-10580, ...).
PORT_OFFSET = 10900
# The lines SECURITY.md's KServe table explains; every other setting is the loopback config's.
KSERVE_CHANGES = {
    "inference_address",
    "management_address",
    "metrics_address",
    "metrics_config",
    "enable_metrics_api",
    "disable_token_authorization",
    "enable_model_api",
    "model_store",
    "model_snapshot",
}


def shipped_config() -> dict[str, str]:
    return read_properties(ROOT / "config.properties")


def kserve_profile() -> dict[str, str]:
    return read_properties(ROOT / "deploy" / "kserve" / "config.properties")


def host(address: str) -> str:
    return address.removeprefix("http://").removeprefix("https://").rsplit(":", 1)[0] if "://" in address else address


@pytest.mark.parametrize(
    "key",
    [
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_address",
        "grpc_management_address",
        "oip_gateway_address",
    ],
)
def test_every_listener_binds_to_loopback(key: str) -> None:
    assert host(shipped_config()[key]) == "127.0.0.1"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("disable_token_authorization", "false", id="tokens-on"),
        pytest.param("enable_model_api", "true", id="model-api-behind-token"),
        pytest.param("allowed_urls", "(?!)", id="no-url-fetched"),
        pytest.param("install_py_dep_per_model", "false", id="no-pip-installs"),
        pytest.param("decode_input_request", "false", id="our-parsers-only"),
        pytest.param("model_store", "model_store", id="store"),
    ],
)
def test_shipped_setting(key: str, value: str) -> None:
    assert shipped_config()[key] == value


def test_no_environment_override_can_switch_tokens_off() -> None:
    assert shipped_config().get("enable_envvars_config", "false") == "false"


@pytest.mark.parametrize(
    "key",
    [
        "inference_address",
        "management_address",
        "grpc_inference_address",
        "grpc_management_address",
        "oip_gateway_address",
    ],
)
def test_kserve_profile_keeps_torchserve_apis_on_loopback(key: str) -> None:
    assert host(kserve_profile()[key]) == "127.0.0.1"


def test_kserve_profile_opens_only_metrics_to_the_pod_network() -> None:
    assert kserve_profile()["metrics_address"] == "http://0.0.0.0:8082"
    assert kserve_profile()["inference_address"] == kserve_profile()["management_address"] == "http://127.0.0.1:8085"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("disable_token_authorization", "true", id="tokens-off-behind-loopback"),
        pytest.param("enable_model_api", "false", id="no-register-at-run-time"),
        pytest.param("metrics_mode", "prometheus", id="prometheus-metrics"),
        pytest.param("enable_metrics_api", "true", id="metrics-api"),
        pytest.param("model_store", "/mnt/models/model-store", id="kserve-store"),
    ],
)
def test_kserve_profile_setting(key: str, value: str) -> None:
    assert kserve_profile()[key] == value


def test_kserve_profile_differs_only_where_security_md_says() -> None:
    profile, shipped = kserve_profile(), shipped_config()
    assert {key for key in profile.keys() | shipped.keys() if profile.get(key) != shipped.get(key)} == KSERVE_CHANGES


def test_kserve_profile_ignores_the_runtimes_environment() -> None:
    assert kserve_profile().get("enable_envvars_config", "false") == "false"


@pytest.mark.parametrize("key", ["max_request_size", "max_response_size"])
def test_body_sizes_are_bounded(key: str) -> None:
    assert 0 < int(shipped_config()[key]) <= MAX_BODY


def test_job_queue_is_bounded() -> None:
    assert 0 < int(shipped_config()["job_queue_size"]) <= 1000


def handler_sources() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(ROOT / "handlers").as_posix(), ast.parse(path.read_text()))
        for path in sorted((ROOT / "handlers").rglob("*.py"))
    ]


def test_every_torch_load_is_weights_only() -> None:
    loads = [
        (name, call)
        for name, tree in handler_sources()
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "load"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "torch"
    ]
    assert [name for name, _ in loads] == ["weights/checkpoints.py"]
    for _, call in loads:
        assert any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )


@pytest.mark.parametrize("module", ["pickle", "dill", "cloudpickle", "marshal", "shelve"])
def test_no_unpickler_is_imported(module: str) -> None:
    for name, tree in handler_sources():
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert module not in imported, f"handlers/{name} imports {module}"


def test_pinned_frontend_bundles_snakeyaml_that_refuses_global_tags() -> None:
    """CVE-2022-1471: SnakeYAML before 2.0 builds whatever Java class a YAML tag names. The jar keeps no version
    metadata for its SnakeYAML, so look for what 2.x added: the tag inspector and the composer's refusal."""
    with zipfile.ZipFile(FRONTEND_JAR) as jar:
        names = set(jar.namelist())
        composer = jar.read("org/yaml/snakeyaml/composer/Composer.class")
    assert {
        "org/yaml/snakeyaml/inspector/TagInspector.class",
        "org/yaml/snakeyaml/inspector/UnTrustedTagInspector.class",
    } <= names
    assert b"Global tag is not allowed: " in composer


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """The shipped config on shifted ports with tokens on and an empty store of its own; no model, no worker."""
    root = tmp_path_factory.mktemp("bare-torchserve")
    store = root / "model_store"
    store.mkdir()
    server = private_server(root / "torchserve", store, port_offset=PORT_OFFSET)
    try:
        start(server, store)
        yield server, store
    finally:
        stop(server)


@pytest.fixture
def origin() -> Iterator[tuple[str, list[str]]]:
    """A web server on loopback that records every path asked of it: whatever TorchServe fetched would show here."""
    asked: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            """Silent: the test reads `asked`."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", asked
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def write_archive(path: Path, name: str, files: Mapping[str, str]) -> Path:
    """A minimal .mar: TorchServe's manifest for model `name`, whose handler never runs (no worker starts), and
    `files`."""
    model = {"modelName": name, "handler": "handler.py", "modelVersion": "1.0"}
    if "model-config.yaml" in files:
        model["configFile"] = "model-config.yaml"
    manifest = {"runtime": "python", "model": model, "archiverVersion": "0.12.0"}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        for entry, text in files.items():
            archive.writestr(entry, text)
    return path


def register(server: Server, url: str, *, api: str = "models", key: bool = True) -> requests.Response:
    """Ask the management API to register `url` (with the real management key unless told otherwise), starting no
    worker."""
    params = {"url": url} if api == "workflows" else {"url": url, "initial_workers": "0", "synchronous": "true"}
    headers = server.headers("management") if key else {}
    return requests.post(f"{server.management}/{api}", params=params, headers=headers, timeout=TIMEOUT)


def registered(server: Server) -> list[str]:
    response = requests.get(f"{server.management}/models", headers=server.headers("management"), timeout=TIMEOUT)
    return [model["modelName"] for model in response.json()["models"]]


def unregister(server: Server, name: str) -> None:
    response = requests.delete(
        f"{server.management}/models/{name}", headers=server.headers("management"), timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


REGISTERED = (
    'Model "{name}" Version: 1.0 registered with 0 initial workers. Use scale workers API to add workers for the model.'
)


def refusal(code: int, kind: str, message: str) -> dict[str, object]:
    """TorchServe's JSON error body."""
    return {"code": code, "type": kind, "message": message}


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("api", "target", "kind"),
    [
        pytest.param("models", "{origin}/ensemble.mar", "ModelNotFoundException", id="model-by-http"),
        pytest.param("models", "file://{outside}", "ModelNotFoundException", id="model-by-file-url"),
        pytest.param("workflows", "{origin}/ensemble.war", "WorkflowNotFoundException", id="workflow-by-http"),
    ],
)
def test_nothing_is_fetched_by_url(
    bare_server: tuple[Server, Path], origin: tuple[str, list[str]], tmp_path: Path, api: str, target: str, kind: str
) -> None:
    """CVE-2023-43654 (ShellTorch's SSRF): allowed_urls=(?!) matches no URL, so TorchServe asks nothing of the
    origin."""
    server, store = bare_server
    base, asked = origin
    url = target.format(origin=base, outside=write_archive(tmp_path / "outside.mar", "outside", {}))
    before = listing(store)
    response = register(server, url, api=api)
    assert (response.status_code, response.json()) == (
        404,
        refusal(404, kind, f"Given URL {url} does not match any allowed URL(s)"),
    )
    assert asked == []
    assert listing(store) == before
    assert registered(server) == []


@pytest.mark.integration
@pytest.mark.parametrize(
    "target",
    [
        pytest.param("{origin}/store/../ensemble.mar", id="http"),
        pytest.param("file://{outside}/../outside/outside.mar", id="file-url"),
        pytest.param("../outside/outside.mar", id="relative-path"),
    ],
)
def test_dot_dot_urls_are_refused_and_copy_nothing_into_the_store(
    bare_server: tuple[Server, Path], origin: tuple[str, list[str]], tmp_path: Path, target: str
) -> None:
    """CVE-2024-35198: before 0.11 a URL with `..` was refused only after its archive had been copied into the store."""
    server, store = bare_server
    base, asked = origin
    outside = tmp_path / "outside"
    outside.mkdir()
    write_archive(outside / "outside.mar", "outside", {})
    url = target.format(origin=base, outside=outside)
    before = listing(store)
    response = register(server, url)
    assert (response.status_code, response.json()) == (
        404,
        refusal(404, "ModelNotFoundException", f"Relative path is not allowed in url: {url}"),
    )
    assert asked == []
    assert listing(store) == before
    assert registered(server) == []


@pytest.mark.integration
def test_an_archive_outside_the_store_is_not_read(bare_server: tuple[Server, Path], tmp_path: Path) -> None:
    """A plain path is looked up in the store by its file name only: an archive elsewhere on disk is never opened."""
    server, _ = bare_server
    elsewhere = write_archive(tmp_path / "elsewhere.mar", "elsewhere", {})
    response = register(server, str(elsewhere))
    assert (response.status_code, response.json()) == (
        404,
        refusal(404, "ModelNotFoundException", f"Model not found at: {elsewhere}"),
    )
    assert registered(server) == []


@pytest.mark.integration
def test_a_model_folder_outside_the_store_takes_the_management_key(
    bare_server: tuple[Server, Path], tmp_path: Path
) -> None:
    """TorchServe 0.12 registers an unpacked model folder by absolute path from anywhere it may read (allowed_urls
    covers URLs only; SECURITY.md): as for every registration, the management key is what stops anyone else."""
    server, _ = bare_server
    folder = tmp_path / "unpacked"
    # A folder holding a single folder is taken for a SageMaker tarball's root: give it a second entry.
    with zipfile.ZipFile(write_archive(tmp_path / "unpacked.mar", "unpacked", {"handler.py": ""})) as archive:
        archive.extractall(folder)
    refused = register(server, str(folder), key=False)
    assert (refused.status_code, refused.json()["type"]) == (400, "InvalidKeyException")
    assert registered(server) == []
    accepted = register(server, str(folder))
    try:
        assert (accepted.status_code, accepted.json()) == (200, {"status": REGISTERED.format(name="unpacked")})
    finally:
        if accepted.ok:
            unregister(server, "unpacked")


def java_tmpdir(server: Server) -> Path:
    """Where the frontend unpacks archives: the -Djava.io.tmpdir the launcher passes (only when TEMP is set), else the
    JVM's /tmp."""
    frontend = psutil.Process(int(server.torchserve_pid_file.read_text()))
    given = [arg.split("=", 1)[1] for arg in frontend.cmdline() if arg.startswith("-Djava.io.tmpdir=")]
    return Path(given[0] if given else "/tmp")


@pytest.mark.integration
def test_zip_slip_archive_is_refused_and_writes_nothing_outside(bare_server: tuple[Server, Path]) -> None:
    """CVE-2023-48299: before 0.9 an archive entry named `../x` was written next to the folder it was unpacked into."""
    server, store = bare_server
    escape = f"zip-slip-{uuid.uuid4().hex}.txt"
    write_archive(store / "inside.mar", "inside", {escape: "stays inside"})
    write_archive(store / "slip.mar", "slip", {f"../{escape}": "escaped"})
    inside = register(server, "inside.mar")  # The same archive without `..` registers: the refusal below is the `..`.
    try:
        assert (inside.status_code, inside.json()) == (200, {"status": REGISTERED.format(name="inside")})
    finally:
        if inside.ok:
            unregister(server, "inside")
    slipped = register(server, "slip.mar")
    assert (slipped.status_code, slipped.json()) == (
        500,
        refusal(500, "InternalServerException", "Failed to save model: slip.mar"),
    )
    assert not (java_tmpdir(server) / escape).exists()
    assert registered(server) == []


@pytest.mark.integration
def test_a_java_tag_in_an_archives_model_config_builds_nothing(
    bare_server: tuple[Server, Path], tmp_path: Path
) -> None:
    """CVE-2022-1471 as ShellTorch used it: the frontend reads an archive's model-config.yaml with SnakeYAML, whose 1.x
    would build the FileOutputStream the tag names, creating the file. 2.x refuses the tag, and TorchServe registers
    the archive with its default settings."""
    server, store = bare_server
    built = tmp_path / "built-by-snakeyaml"
    write_archive(
        store / "tagged.mar", "tagged", {"model-config.yaml": f'batchSize: !!java.io.FileOutputStream ["{built}"]\n'}
    )
    response = register(server, "tagged.mar")
    try:
        assert (response.status_code, response.json()) == (200, {"status": REGISTERED.format(name="tagged")})
    finally:
        if response.ok:
            unregister(server, "tagged")
    assert not built.exists()
    log = (server.workdir / "logs" / "ts_log.log").read_text()
    assert "ComposerException: Global tag is not allowed: tag:yaml.org,2002:java.io.FileOutputStream" in log


def test_security_md_maps_every_published_cve_to_tests_that_exist() -> None:
    """A renamed or removed test must not leave SECURITY.md's CVE table pointing at nothing."""
    rows = re.findall(r"^\| (CVE-\d{4}-\d+) .*\| (.*) \|$", (ROOT / "SECURITY.md").read_text(), re.MULTILINE)
    assert [cve for cve, _ in rows] == [
        "CVE-2023-43654",
        "CVE-2022-1471",
        "CVE-2023-48299",
        "CVE-2024-35198",
        "CVE-2024-35199",
    ]
    missing = []
    for cve, tests in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[([\w-]+)\])?`", tests)
        if not named:
            missing.append(f"{cve}: no test")
        for module, test, case in named:
            source = (ROOT / "tests" / module).read_text()
            if f"def {test}(" not in source or (case and f'id="{case}"' not in source):
                missing.append(f"{cve}: {module}::{test}[{case}]")
    assert missing == []
