"""The settings SECURITY.md promises, checked against the shipped config.properties, the KServe profile and the handler source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 8 * 1024 * 1024
# The lines SECURITY.md's KServe table explains; every other setting is the loopback config's.
KSERVE_CHANGES = {
    "inference_address", "management_address", "metrics_address", "metrics_config", "enable_metrics_api",
    "disable_token_authorization", "enable_model_api", "model_store", "model_snapshot",
}


def read_config(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[name.strip()] = value.strip()
    return settings


def shipped_config() -> dict[str, str]:
    return read_config(ROOT / "config.properties")


def kserve_profile() -> dict[str, str]:
    return read_config(ROOT / "deploy" / "kserve" / "config.properties")


def host(address: str) -> str:
    return address.removeprefix("http://").removeprefix("https://").rsplit(":", 1)[0] if "://" in address else address


@pytest.mark.parametrize(
    "key", ["inference_address", "management_address", "metrics_address", "grpc_inference_address", "grpc_management_address", "oip_gateway_address"]
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


@pytest.mark.parametrize("key", ["inference_address", "management_address", "grpc_inference_address", "grpc_management_address", "oip_gateway_address"])
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
    return [(path.relative_to(ROOT / "handlers").as_posix(), ast.parse(path.read_text())) for path in sorted((ROOT / "handlers").rglob("*.py"))]


def test_every_torch_load_is_weights_only() -> None:
    loads = [
        (name, call)
        for name, tree in handler_sources()
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "load"
        and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
    ]
    assert [name for name, _ in loads] == ["weights/checkpoints.py"]
    for _, call in loads:
        assert any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


@pytest.mark.parametrize("module", ["pickle", "dill", "cloudpickle", "marshal", "shelve"])
def test_no_unpickler_is_imported(module: str) -> None:
    for name, tree in handler_sources():
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert module not in imported, f"handlers/{name} imports {module}"
