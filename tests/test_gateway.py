"""The v2 gateway (gateway/open_inference.py): its pure parts without a server, its refusals in-process, and
`/predictions` query parameters and a bounded load through it against a real TorchServe on 127.0.0.1.

The in-process tests run the ASGI application through httpx's ASGITransport: they reach only answers the gateway
gives itself (nothing is forwarded to a TorchServe that is not there, except to show the 502 for one that is not).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from gateway.open_inference import (
    OWN_ROUTES,
    PREDICTIONS,
    Gateway,
    GatewayError,
    Keys,
    ParameterError,
    Settings,
    body_refusal,
    forwarded_headers,
    main,
    model_answer,
    parameter_header,
    query_parameter_headers,
    read_settings,
    relayed_headers,
    request_start,
    torchserve_message,
    unknown_model,
)
from tests.conftest import assert_same_predictions, image_bytes, reference
from tests.protocol_clients import REFUSED, TORCHSERVE_REFUSED

VALID = (
    "valid: policy, k, threshold, confidence, early_exit, members, top_k, sequence, min_run, uncertainty, deadline_ms, "
    "min_members"
)
NOT_A_HEADER = "holds a character an HTTP header cannot carry (a control or non-ASCII character); send that parameter"
TIMEOUT = 60


@pytest.mark.parametrize(
    ("name", "header"),
    [
        pytest.param("policy", "X-Ensemble-Policy", id="one-word"),
        pytest.param("k", "X-Ensemble-K", id="one-letter"),
        pytest.param("early_exit", "X-Ensemble-Early-Exit", id="two-words"),
        pytest.param("top_k", "X-Ensemble-Top-K", id="word-and-letter"),
        pytest.param("min_run", "X-Ensemble-Min-Run", id="min-run"),
    ],
)
def test_parameter_header_names(name: str, header: str) -> None:
    assert parameter_header(name) == header


def test_every_parameter_header_is_one_the_handler_reads() -> None:
    from handlers.inputs.parameters import PARAMETER_HEADERS, REQUEST_PARAMETERS

    assert {parameter_header(name).lower(): name for name in REQUEST_PARAMETERS} == PARAMETER_HEADERS


@pytest.mark.parametrize(
    ("query", "headers", "added"),
    [
        pytest.param("", {}, [], id="empty"),
        pytest.param("policy=any", {}, [("X-Ensemble-Policy", "any")], id="policy"),
        pytest.param("policy=k_of_n&k=2", {}, [("X-Ensemble-Policy", "k_of_n"), ("X-Ensemble-K", "2")], id="two"),
        pytest.param(
            "sequence=true&min_run=3", {}, [("X-Ensemble-Sequence", "true"), ("X-Ensemble-Min-Run", "3")], id="min-run"
        ),
        pytest.param(
            "members=mobile%2Cpool_rgb", {}, [("X-Ensemble-Members", "mobile,pool_rgb")], id="percent-encoded"
        ),
        pytest.param("threshold=0.25&threshold=0.25", {}, [("X-Ensemble-Threshold", "0.25")], id="repeated-same"),
        pytest.param("policy=", {}, [("X-Ensemble-Policy", "")], id="blank-value-kept"),
        pytest.param("policy=any", {"x-ensemble-policy": "any"}, [], id="header-agrees"),
        pytest.param("policy=any", {"x-ensemble-policy": " any "}, [], id="header-agrees-after-strip"),
        pytest.param("top_k=2", {"x-ensemble-policy": "max"}, [("X-Ensemble-Top-K", "2")], id="other-header-untouched"),
    ],
)
def test_query_parameters_become_headers(query: str, headers: dict[str, str], added: list[tuple[str, str]]) -> None:
    assert query_parameter_headers(query, headers) == added


@pytest.mark.parametrize(
    ("query", "headers", "message"),
    [
        pytest.param(
            "polcy=any",
            {},
            f"unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); {VALID}",
            id="misspelt",
        ),
        pytest.param(
            "colour=red&policy=any", {}, f"unknown parameter(s) ['colour']; {VALID}", id="unknown-beside-known"
        ),
        pytest.param(
            "treshold=0.2&colour=red",
            {},
            f"unknown parameter(s) ['colour', 'treshold'] (closest valid: 'treshold' -> 'threshold'); {VALID}",
            id="two-unknown",
        ),
        pytest.param(
            "policy=any&policy=all", {}, "policy given twice with different values: 'any' and 'all'", id="query-twice"
        ),
        pytest.param(
            "policy=any",
            {"x-ensemble-policy": "all"},
            "policy given twice with different values: 'any' (query) and 'all' (X-Ensemble-Policy header)",
            id="query-and-header-disagree",
        ),
        pytest.param(
            "min_run=2",
            {"x-ensemble-min-run": "3"},
            "min_run given twice with different values: '2' (query) and '3' (X-Ensemble-Min-Run header)",
            id="min-run-disagrees",
        ),
        pytest.param(
            "members=caf%C3%A9",
            {},
            f"query parameter members='café' {NOT_A_HEADER} in the JSON body's parameters instead",
            id="non-ascii",
        ),
        pytest.param(
            "policy=any%0D%0AX-Ensemble-K:%202",
            {},
            f"query parameter policy='any\\r\\nX-Ensemble-K: 2' {NOT_A_HEADER} in the JSON body's parameters instead",
            id="header-injection",
        ),
    ],
)
def test_query_parameters_the_handler_would_refuse(query: str, headers: dict[str, str], message: str) -> None:
    with pytest.raises(ParameterError) as caught:
        query_parameter_headers(query, headers)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("path", "groups"),
    [
        pytest.param("/v2", (None, None, None, None), id="server-metadata"),
        pytest.param("/v2/", (None, None, None, None), id="server-metadata-slash"),
        pytest.param("/v2/health/live", ("live", None, None, None), id="live"),
        pytest.param("/v2/health/ready", ("ready", None, None, None), id="ready"),
        pytest.param("/v2/models/trio", (None, "trio", None, None), id="model"),
        pytest.param("/v2/models/trio/ready", (None, "trio", None, "/ready"), id="model-ready"),
        pytest.param("/v2/models/trio/versions/2.1", (None, "trio", "2.1", None), id="version"),
        pytest.param("/v2/models/trio/versions/2.1/ready", (None, "trio", "2.1", "/ready"), id="version-ready"),
        pytest.param("/v2/models/a%2Fb", (None, "a%2Fb", None, None), id="encoded-name"),
    ],
)
def test_own_routes(path: str, groups: tuple[str | None, ...]) -> None:
    route = OWN_ROUTES.fullmatch(path)
    assert route is not None
    assert (route["health"], route["model"], route["version"], route["ready"]) == groups


@pytest.mark.parametrize(
    "path",
    ["/v2/models/trio/infer", "/v2/health/started", "/v2/models", "/v1/models/trio:predict", "/predictions/trio"],
    ids=["infer", "unknown-health", "model-list", "v1", "predictions"],
)
def test_forwarded_routes(path: str) -> None:
    assert OWN_ROUTES.fullmatch(path) is None


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        pytest.param("/predictions/trio", True, id="name"),
        pytest.param("/predictions/trio/2.1", True, id="version"),
        pytest.param("/predictions/trio/", True, id="slash"),
        pytest.param("/predictions", False, id="no-name"),
        pytest.param("/predictions/trio/2.1/extra", False, id="too-deep"),
        pytest.param("/models/trio/invoke", False, id="invoke-keeps-its-query"),
        pytest.param("/v2/models/trio/infer", False, id="v2"),
    ],
)
def test_predictions_paths(path: str, matches: bool) -> None:
    assert (PREDICTIONS.fullmatch(path) is not None) is matches


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        pytest.param({}, None, id="no-body"),
        pytest.param({"content-length": "100"}, None, id="at-the-limit"),
        pytest.param(
            {"content-length": "101"},
            (413, "request body of 101 bytes is over TorchServe's max_request_size of 100 bytes"),
            id="over-the-limit",
        ),
        pytest.param(
            {"transfer-encoding": "chunked"},
            (411, "send the body with a Content-Length; chunked bodies are not accepted"),
            id="chunked",
        ),
    ],
)
def test_body_refusal(headers: dict[str, str], refusal: tuple[int, str] | None) -> None:
    assert body_refusal(headers, 100) == refusal


def test_forwarded_headers_drop_the_connections_own() -> None:
    sent = [
        (b"host", b"127.0.0.1:8083"),
        (b"authorization", b"Bearer k"),
        (b"content-type", b"image/png"),
        (b"content-length", b"12"),
        (b"Connection", b"keep-alive, X-Trace"),
        (b"keep-alive", b"timeout=5"),
        (b"expect", b"100-continue"),
        (b"te", b"trailers"),
        (b"x-ensemble-policy", b"any"),
        (b"x-ensemble-policy", b"any"),
        (b"Upgrade", b"h2c"),
    ]
    assert forwarded_headers(sent) == [
        (b"authorization", b"Bearer k"),
        (b"content-type", b"image/png"),
        (b"x-ensemble-policy", b"any"),
        (b"x-ensemble-policy", b"any"),
    ]


@pytest.mark.parametrize(
    ("headers", "added"),
    [
        pytest.param({}, [(b"x-request-start", b"t=1765100000.123456")], id="stamped-on-arrival"),
        pytest.param({"x-request-start": "t=1765099999.5"}, [], id="a-proxy-before-it-stamped"),
    ],
)
def test_the_gateway_stamps_when_it_received_a_request(headers: dict[str, str], added: list) -> None:
    assert request_start(headers, 1765100000.123456) == added


def test_relayed_headers_keep_the_length_of_the_relayed_body() -> None:
    answered = [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"7f"),
        (b"content-length", b"321"),
        (b"connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert relayed_headers(answered) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"7f"),
        (b"content-length", b"321"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


V2_TENSORS = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [-1]}], "outputs": [{"name": "label"}]}


def described(*statuses: str, min_workers: int = 1, metadata: Any = None) -> dict[str, Any]:
    """TorchServe's `GET /models/<name>` entry, as far as the gateway reads it."""
    entry: dict[str, Any] = {
        "modelVersion": "2.1",
        "minWorkers": min_workers,
        "workers": [{"status": status} for status in statuses],
    }
    if metadata is not None:
        entry["customizedMetadata"] = metadata
    return entry


@pytest.mark.parametrize(
    ("requested", "entry", "ready", "answer"),
    [
        pytest.param(None, described("READY"), True, (200, {"name": "trio", "ready": True}), id="ready"),
        pytest.param(
            None,
            described("READY", "UNLOADING", min_workers=2),
            True,
            (400, {"name": "trio", "ready": False}),
            id="fewer-than-min-workers",
        ),
        pytest.param(None, described(min_workers=0), True, (400, {"name": "trio", "ready": False}), id="no-worker"),
        pytest.param("2.1", described("READY"), True, (200, {"name": "trio", "ready": True}), id="served-version"),
        pytest.param(
            "9.9",
            described("READY"),
            True,
            (404, {"error": "model 'trio' has version '2.1' (TorchServe's default), not '9.9'"}),
            id="other-version",
        ),
        pytest.param(
            None,
            described("READY", metadata={"v2_metadata": V2_TENSORS}),
            False,
            (200, {"name": "trio", "versions": ["2.1"], "platform": "pytorch_torchserve", **V2_TENSORS}),
            id="metadata",
        ),
        pytest.param(
            None,
            described("READY", metadata=json.dumps({"v2_metadata": V2_TENSORS})),
            False,
            (200, {"name": "trio", "versions": ["2.1"], "platform": "pytorch_torchserve", **V2_TENSORS}),
            id="metadata-as-a-string",
        ),
        pytest.param(
            None,
            described("READY", metadata={"labels": ["a"]}),
            False,
            (
                501,
                {
                    "error": "model 'trio' describes no v2 tensors (no v2_metadata in its describe): it is no ensemble "
                    "archive, or one built before v2 metadata; rebuild it (make rebuild NAME=...)"
                },
            ),
            id="no-v2-metadata",
        ),
    ],
)
def test_model_answer(requested: str | None, entry: dict[str, Any], ready: bool, answer: tuple[int, dict]) -> None:
    assert model_answer("trio", requested, entry, ready=ready) == answer


@pytest.mark.parametrize(
    ("registered", "message"),
    [
        pytest.param(["trio", "pair", "tags"], "unknown model 'nosuch'; registered: pair, tags, trio", id="some"),
        pytest.param([], "unknown model 'nosuch'; registered: none", id="none"),
    ],
)
def test_unknown_model(registered: list[str], message: str) -> None:
    assert unknown_model("nosuch", registered) == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"code": 503, "type": "ServiceUnavailableException", "message": "busy"}', "busy", id="json"),
        pytest.param(b"<html>oops</html>", "<html>oops</html>", id="not-json"),
        pytest.param(b'{"code": 500}', '{"code": 500}', id="no-message"),
        pytest.param(b"", "Internal Server Error", id="empty"),
    ],
)
def test_torchserve_message(body: bytes, message: str) -> None:
    assert torchserve_message(body, "Internal Server Error") == message


CONFIG = """# a comment=with an equals sign
inference_address=http://127.0.0.1:8080
management_address=http://127.0.0.1:8081
oip_gateway_address=http://127.0.0.1:8083
"""


@pytest.mark.parametrize(
    ("extra", "settings"),
    [
        pytest.param(
            "", Settings(("127.0.0.1", 8083), ("127.0.0.1", 8080), ("127.0.0.1", 8081), True, 6553500), id="defaults"
        ),
        pytest.param(
            "disable_token_authorization=true\nmax_request_size=8388608\n",
            Settings(("127.0.0.1", 8083), ("127.0.0.1", 8080), ("127.0.0.1", 8081), False, 8388608),
            id="tokens-off-and-a-size",
        ),
        pytest.param(
            "inference_address : http://127.0.0.1:9080\nmax_request_size 100\\\n  0\n",
            Settings(("127.0.0.1", 8083), ("127.0.0.1", 9080), ("127.0.0.1", 8081), True, 1000),
            id="java-properties-rules",
        ),
        pytest.param(
            "oip_gateway_address=http://[::1]:9083\n",
            Settings(("::1", 9083), ("127.0.0.1", 8080), ("127.0.0.1", 8081), True, 6553500),
            id="ipv6-loopback",
        ),
    ],
)
def test_read_settings(tmp_path: Path, extra: str, settings: Settings) -> None:
    (tmp_path / "config.properties").write_text(CONFIG + extra)
    assert read_settings(tmp_path / "config.properties") == settings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            CONFIG.replace("oip_gateway_address=http://127.0.0.1:8083\n", ""),
            "no oip_gateway_address; add e.g. oip_gateway_address=http://127.0.0.1:8083",
            id="no-gateway",
        ),
        pytest.param(
            CONFIG.replace("127.0.0.1:8083", "0.0.0.0:8083"),
            "oip_gateway_address must be a loopback IP address (it has no TLS), got '0.0.0.0'",
            id="all-interfaces",
        ),
        pytest.param(
            CONFIG.replace("127.0.0.1:8083", "localhost:8083"),
            "oip_gateway_address must be a loopback IP address (it has no TLS), got 'localhost'",
            id="a-name",
        ),
        pytest.param(
            CONFIG.replace("http://127.0.0.1:8080", "https://127.0.0.1:8080"),
            "inference_address must be http://<host>:<port>, got 'https://127.0.0.1:8080'",
            id="https-inference",
        ),
        pytest.param(
            CONFIG.replace("management_address=http://127.0.0.1:8081\n", ""),
            "no management_address",
            id="no-management",
        ),
    ],
)
def test_settings_the_gateway_refuses(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.properties"
    config.write_text(text)
    with pytest.raises(GatewayError) as caught:
        read_settings(config)
    assert str(caught.value) == f"{config}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            None, "gateway: config.properties: cannot read: [Errno 2] No such file or directory", id="no-file"
        ),
        pytest.param(
            CONFIG.replace("127.0.0.1:8083", "10.0.0.1:8083"),
            "gateway: {config}: oip_gateway_address must be a loopback IP address (it has no TLS), got '10.0.0.1'",
            id="not-loopback",
        ),
    ],
)
def test_the_command_line_exits_with_the_reason(tmp_path: Path, text: str | None, message: str) -> None:
    config = tmp_path / "config.properties"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(config), "--key-file", str(tmp_path / "key_file.json")])
    assert str(caught.value).startswith(message.format(config=config))


def write_keys(path: Path, inference: str = "inf-key", *, expires: datetime | None = None) -> None:
    """A key file as TorchServe 0.12 writes it."""
    expiration = (expires or datetime.now(UTC) + timedelta(hours=1)).isoformat()
    keys = {
        "management": {"key": "mgmt-key", "expiration time": expiration},
        "inference": {"key": inference, "expiration time": expiration},
        "API": {"key": "api-key"},
    }
    path.write_text(json.dumps(keys))


@pytest.mark.parametrize(
    ("authorization", "refusal"),
    [
        pytest.param("Bearer inf-key", None, id="inference-key"),
        pytest.param("bearer inf-key", None, id="scheme-any-case"),
        pytest.param(None, (400, REFUSED), id="missing"),
        pytest.param("Bearer wrong", (400, REFUSED), id="wrong"),
        pytest.param("Bearer mgmt-key", (400, REFUSED), id="management-key"),
        pytest.param("Basic inf-key", (400, REFUSED), id="other-scheme"),
    ],
)
def test_keys_refusal(tmp_path: Path, authorization: str | None, refusal: tuple[int, dict] | None) -> None:
    write_keys(tmp_path / "key_file.json")
    assert Keys(tmp_path / "key_file.json").refusal(authorization) == refusal


def test_keys_refuse_an_expired_key(tmp_path: Path) -> None:
    write_keys(tmp_path / "key_file.json", expires=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert Keys(tmp_path / "key_file.json").refusal("Bearer inf-key") == (
        400,
        {
            "error": "Token Authorization failed: the inference key expired at 2026-01-02T03:04:05+00:00; get a new "
            "one with POST /token?type=inference on the management API (authorised by the API key) and send that"
        },
    )


def test_keys_before_torchserve_wrote_them(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "key_file.json")
    assert keys.refusal("Bearer inf-key") == (
        503,
        {"error": f"TorchServe has written no key file at {tmp_path / 'key_file.json'} yet; is it running?"},
    )
    assert keys.headers("management") == {}


def test_keys_follow_a_rewrite_and_ride_out_a_half_written_file(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    keys = Keys(path)
    write_keys(path, "first")
    assert keys.headers("inference") == {"Authorization": "Bearer first"}
    write_keys(path, "second")
    assert keys.headers("inference") == {"Authorization": "Bearer second"}
    path.write_text('{"inference": {"key": "thi')
    assert keys.headers("inference") == {"Authorization": "Bearer second"}
    assert keys.headers("management") == {"Authorization": "Bearer mgmt-key"}


# In-process: the ASGI application, with a key file but no TorchServe behind it.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ask(tmp_path: Path, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to a gateway whose TorchServe address has nothing listening, its tokens in tmp_path."""
    write_keys(tmp_path / "key_file.json")
    settings = Settings(("127.0.0.1", 8083), ("127.0.0.1", free_port()), ("127.0.0.1", free_port()), True, 100)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False) as upstream:
            gateway = Gateway(settings, Keys(tmp_path / "key_file.json"), upstream)
            transport = httpx.ASGITransport(app=gateway)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8083") as client:
                response = await client.request(method, path, **kwargs)
                await response.aread()
                return response

    return asyncio.run(send())


TOKEN = {"Authorization": "Bearer inf-key"}


async def chunks() -> Any:
    yield b"abc"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "body", "headers"),
    [
        pytest.param(
            "POST",
            "/predictions/trio",
            {"content": b"x" * 101, "headers": TOKEN},
            413,
            {"error": "request body of 101 bytes is over TorchServe's max_request_size of 100 bytes"},
            {"connection": "close"},
            id="over-max-request-size",
        ),
        pytest.param(
            "POST",
            "/predictions/trio",
            {"content": chunks(), "headers": TOKEN},
            411,
            {"error": "send the body with a Content-Length; chunked bodies are not accepted"},
            {"connection": "close"},
            id="chunked",
        ),
        pytest.param(
            "POST",
            "/v2/health/live",
            {"headers": TOKEN},
            405,
            {"error": "/v2/health/live answers GET only"},
            {"allow": "GET", "server": "ensemble-oip-gateway"},
            id="own-route-post",
        ),
        pytest.param("GET", "/v2", {}, 400, REFUSED, {}, id="own-route-without-token"),
        pytest.param(
            "GET",
            "/v2",
            {"headers": TOKEN},
            200,
            {"name": "ensemble-torchserve", "version": "0.12.0", "extensions": []},
            {},
            id="server-metadata",
        ),
        pytest.param("GET", "/v2/health/live", {"headers": TOKEN}, 400, {"live": False}, {}, id="torchserve-not-live"),
        pytest.param(
            "POST",
            "/predictions/trio?polcy=any",
            {"content": b"png", "headers": TOKEN},
            400,
            {
                "code": 400,
                "type": "RequestError",
                "message": f"unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); {VALID}",
            },
            {},
            id="unknown-query-parameter",
        ),
        pytest.param(
            "POST",
            "/predictions/trio/2.1?policy=any",
            {"content": b"png", "headers": TOKEN | {"X-Ensemble-Policy": "max"}},
            400,
            {
                "code": 400,
                "type": "RequestError",
                "message": "policy given twice with different values: 'any' (query) and 'max' "
                "(X-Ensemble-Policy header)",
            },
            {},
            id="query-and-header-disagree",
        ),
    ],
)
def test_the_gateways_own_answers(
    tmp_path: Path, method: str, path: str, kwargs: dict, status: int, body: dict, headers: dict[str, str]
) -> None:
    response = ask(tmp_path, method, path, **kwargs)
    assert (response.status_code, response.json()) == (status, body)
    assert response.headers["content-type"] == "application/json"
    assert {name: response.headers.get(name) for name in headers} == headers


def test_a_torchserve_that_is_not_there_is_a_502(tmp_path: Path) -> None:
    response = ask(tmp_path, "POST", "/predictions/trio?policy=any", content=b"png", headers=TOKEN)
    assert response.status_code == 502
    assert response.json()["error"].startswith("TorchServe's inference API at 127.0.0.1:")


# Against a real TorchServe with the real token: `/predictions` query parameters and a bounded load.

LOAD_REQUESTS = 64
LOAD_CONCURRENCY = 8
LOAD_DEADLINE_S = 240


@pytest.fixture(scope="module")
def server(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = private_server(tmp_path_factory.mktemp("torchserve"), test_store, port_offset=11100)
    try:
        start(instance, test_store)
        for name in ("trio", "pair"):
            register(instance, name, workers=1)
        yield instance
    finally:
        stop(instance)


def gateway(server: Server) -> str:
    """The gateway's URL: the shipped config names one."""
    assert server.gateway is not None
    return server.gateway


def predict(base: str, path: str, image: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(
        f"{base}/{path}", data=image, headers={"Content-Type": "image/png", **headers}, timeout=TIMEOUT
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("predictions/pair?policy=any", {}, id="query"),
        pytest.param("predictions/pair/2.1?policy=any", {}, id="query-with-version"),
        pytest.param("predictions/pair?policy=any", {"X-Ensemble-Policy": "any"}, id="query-and-header-agree"),
        pytest.param("predictions/pair?policy=any&threshold=0.9", {}, id="two-parameters"),
    ],
)
def test_predictions_query_parameters_reach_the_handler_through_the_gateway(
    server: Server, test_store: Path, path: str, headers: dict[str, str]
) -> None:
    image = image_bytes(71)
    through = predict(gateway(server), path, image, {**server.headers("inference"), **headers})
    assert through.status_code == 200, through.text
    assert (through.json()["policy"]["name"], "warning" in through.json()) == ("any", False)
    params = dict(pair.split("=") for pair in path.partition("?")[2].split("&"))
    assert_same_predictions(through.json()["predictions"], reference(test_store, "pair", [image], **params))


@pytest.mark.integration
def test_torchserve_alone_drops_the_predictions_query(server: Server) -> None:
    """Why the gateway translates: straight to TorchServe, `?policy=any` is lost and pair's own majority answers,
    and the answer says that no parameter reached the ensemble."""
    direct = predict(server.inference, "predictions/pair?policy=any", image_bytes(71), server.headers("inference"))
    answer = direct.json()
    assert (direct.status_code, answer["policy"]["name"]) == (200, "majority")
    assert answer["warning"].startswith("no request parameter reached the ensemble, so its defaults answered (policy=")
    assert "TorchServe drops the query string of /predictions/<name>" in answer["warning"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "headers", "message"),
    [
        pytest.param(
            "predictions/pair?polcy=any",
            {},
            f"unknown parameter(s) ['polcy'] (closest valid: 'polcy' -> 'policy'); {VALID}",
            id="misspelt",
        ),
        pytest.param(
            "predictions/pair?policy=any",
            {"X-Ensemble-Policy": "all"},
            "policy given twice with different values: 'any' (query) and 'all' (X-Ensemble-Policy header)",
            id="query-and-header-disagree",
        ),
    ],
)
def test_predictions_query_the_handler_would_refuse_is_a_400(
    server: Server, path: str, headers: dict[str, str], message: str
) -> None:
    response = predict(gateway(server), path, image_bytes(72), {**server.headers("inference"), **headers})
    assert (response.status_code, response.json()) == (400, {"code": 400, "type": "RequestError", "message": message})


@pytest.mark.integration
def test_without_the_token_torchserve_refuses_before_any_query_check(server: Server) -> None:
    response = predict(gateway(server), "predictions/pair?polcy=any", image_bytes(72), {})
    assert (response.status_code, response.json()) == (400, TORCHSERVE_REFUSED)


@pytest.mark.integration
def test_a_large_body_streams_through_to_the_same_answer(server: Server) -> None:
    """About 6 MB of base64 PNGs (max_request_size is 8 MiB): the gateway's answer is TorchServe's direct one."""
    images = [image_bytes(80 + i, size=(400, 400)) for i in range(10)]
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}).encode()
    assert 5_000_000 < len(body) < int(server.setting("max_request_size"))
    headers = {"Content-Type": "application/json", **server.headers("inference")}
    through, direct = (
        requests.post(f"{base}/v1/models/trio:predict", data=body, headers=headers, timeout=TIMEOUT)
        for base in (gateway(server), server.inference)
    )
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    assert len(through.json()["predictions"]) == 10


@pytest.mark.integration
def test_concurrent_load_through_the_gateway_loses_nothing(server: Server, test_store: Path) -> None:
    """64 requests, 8 at once, each its own image and half of them `?policy=max`: every one answers 200 with its own
    image's predictions under its own policy, within the deadline."""
    images = [image_bytes(500 + i) for i in range(LOAD_REQUESTS)]
    policies = ["max" if i % 2 else None for i in range(LOAD_REQUESTS)]
    headers = server.headers("inference")

    def send(i: int) -> requests.Response:
        path = "predictions/trio" + (f"?policy={policies[i]}" if policies[i] else "")
        return predict(gateway(server), path, images[i], headers)

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=LOAD_CONCURRENCY) as pool:
        responses = list(pool.map(send, range(LOAD_REQUESTS), timeout=LOAD_DEADLINE_S))
    elapsed = time.monotonic() - began
    assert [response.status_code for response in responses] == [200] * LOAD_REQUESTS
    assert elapsed < LOAD_DEADLINE_S
    for response, image, policy in zip(responses, images, policies, strict=True):
        answer = response.json()
        assert answer["policy"]["name"] == (policy or "mean")
        expected = reference(test_store, "trio", [image], **({"policy": policy} if policy else {}))
        assert_same_predictions(answer["predictions"], expected)
