"""The Open Inference Protocol's health and metadata routes, answered in front of TorchServe 0.12.

Usage: python -m gateway.open_inference --config config.properties [--key-file key_file.json] [--torchserve-pid PID]

Why it exists: TorchServe 0.12 routes `POST /v2/models/<name>/infer` to our handler, which speaks v2
itself, but a v2 client (`tritonclient.http`, KServe's clients) also asks `GET /v2/health/live`,
`/v2/health/ready`, `/v2`, `/v2/models/<name>[/versions/<v>]` and `.../ready`, and TorchServe answers
all of them 404. Its own `OpenInferenceProtocolRequestHandler` (`ts_open_inference_protocol=true`, or
`TS_OPEN_INFERENCE_PROTOCOL=oip`) does not close the gap: it answers `/v2/health/live` with
`{"live": true}` and `/v2/health/ready` with `{"ready": true}` as fixed values, even with no model
loaded and for any method; `/v2` with `{"name": "Torchserve", "version": "0.12.0", "extenstion": [...]}`
(the key misspelt); and has no REST route for a model's metadata or readiness, which stay 404. A
readiness that cannot say "not ready" is worse than none for a load balancer. A TorchServe plugin
endpoint named `v2` is no way out either: plugin endpoints are matched before the inference handler,
so it would also swallow `/v2/models/<name>/infer`.

So this small server, on loopback next to TorchServe, answers those routes from TorchServe's own
state and forwards every other request to TorchServe's inference address; one base URL then serves
v2 inference, v1 and `/predictions` too:

- `GET /v2/health/live`: 200 `{"live": true}` while TorchServe's inference API answers `/ping` at all.
- `GET /v2/health/ready`: 200 `{"ready": true}` while `/ping` says Healthy (every model has its
  minimum of healthy workers).
- `GET /v2`: `{"name": "ensemble-torchserve", "version": <TorchServe's>, "extensions": []}`.
- `GET /v2/models/<name>[/versions/<v>]/ready`: 200 `{"name", "ready": true}` while the model has at
  least max(1, minWorkers) READY workers, from the management API.
- `GET /v2/models/<name>[/versions/<v>]`: `{"name", "versions", "platform", "inputs", "outputs"}`,
  the tensors from the `v2_metadata` of the ensemble's describe (`?customized=true`).
  Both answer for the version TorchServe serves the model as by default; another `<v>` is a 404.
- `/predictions/<name>[/<version>]?policy=any&...`: TorchServe 0.12 drops that query string before the
  worker sees it, so the gateway forwards each query parameter as the `X-Ensemble-<Name>` header the handler
  reads (`min_run` as `X-Ensemble-Min-Run`); an unknown name, or a value that disagrees with the same header,
  is the handler's 400 `{"code", "type": "RequestError", "message"}`, answered here.

"False" is 400 with `{"live": false}` / `{"ready": false}`: the protocol says 200 means true and a 4xx
false, and Triton answers 400; `tritonclient` only checks for 200. An unknown model or version is
404 with `{"error": ...}` naming the registered models, or the version served.

Tokens: with TorchServe's token authorization on, these routes want `Authorization: Bearer <inference
key>` exactly as TorchServe's own inference API does (a missing or wrong one is TorchServe's 400); the
gateway reads the keys from TorchServe's key_file.json on every check, so rotated keys apply at once,
and calls the management API with the management key itself. Forwarded requests keep their own
headers: TorchServe checks their token. A request whose token fails is forwarded untouched, so that
TorchServe refuses it, as it would refuse it directly.

Bounds: the gateway binds a loopback address only, connects to nothing but the configured TorchServe
addresses (no proxy from the environment), refuses bodies over TorchServe's `max_request_size` (and
chunked bodies) before reading them, streams the bodies it forwards both ways instead of holding them,
and, given `--torchserve-pid`, exits when that TorchServe process is gone.

Stack: an ASGI application on Starlette's request and response types, served by uvicorn with its h11
parser, relaying through one pooled httpx client (docs/libraries.md says why these).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httpx
import psutil
import uvicorn
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from handlers.config.files import read_properties
from handlers.errors import ConfigError
from handlers.inputs.parameters import REQUEST_PARAMETERS, unknown_parameters

SERVER_NAME = "ensemble-torchserve"
PLATFORM = "pytorch_torchserve"
# The Server header of the gateway's own answers; forwarded answers carry TorchServe's headers only.
SERVER_HEADER = "ensemble-oip-gateway"
# TorchServe's own default when config.properties sets none.
DEFAULT_MAX_REQUEST_SIZE = 6553500
# Longer than any model's response timeout we ship (60 s), so TorchServe, not the gateway, times a request out.
UPSTREAM_TIMEOUT_S = 300
# Connections to TorchServe at once; more requests in flight wait for one (up to UPSTREAM_TIMEOUT_S).
UPSTREAM_CONNECTIONS = 256
UPSTREAM_IDLE_CONNECTIONS = 64
# An idle client connection is closed after this long.
CLIENT_IDLE_TIMEOUT_S = 120
# On SIGTERM or once TorchServe is gone, requests in flight get this long to finish.
SHUTDOWN_GRACE_S = 5
LISTEN_BACKLOG = 128
WATCH_INTERVAL_S = 1.0
# Headers of one connection (RFC 9110, 7.6.1), never relayed either way.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# The client's Host names the gateway and its Expect was answered here; its Content-Length is re-sent once checked.
NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", "content-length"}
WITH_BODY = ("POST", "PUT", "PATCH")
OWN_ROUTES = re.compile(
    r"/v2(?:/health/(?P<health>live|ready)"
    r"|/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<ready>/ready)?)?/?"
)
# TorchServe's inference route whose query string never reaches the worker.
PREDICTIONS = re.compile(r"/predictions/[^/]+(?:/[^/]+)?/?")
# What an HTTP header value can carry unchanged: printable ASCII.
HEADER_VALUE = re.compile(r"[\x20-\x7e]*")

log = logging.getLogger("gateway")


class GatewayError(Exception):
    """A setting the gateway cannot run with; the message says which and why."""


class ParameterError(Exception):
    """A `/predictions` query the handler would refuse; the message is the handler's."""


@dataclass(frozen=True)
class Settings:
    """What the gateway reads from TorchServe's config.properties: where to listen, where TorchServe is, its rules."""

    listen: tuple[str, int]
    inference: tuple[str, int]
    management: tuple[str, int]
    tokens: bool
    max_request_size: int


def read_settings(config: Path) -> Settings:
    """The gateway's settings from `config`, read by java.util.Properties' rules as TorchServe reads it; raise
    GatewayError for a missing or non-loopback gateway address (ConfigError for a file that cannot be read)."""
    properties = read_properties(config)
    if "oip_gateway_address" not in properties:
        raise GatewayError(f"{config}: no oip_gateway_address; add e.g. oip_gateway_address=http://127.0.0.1:8083")
    listen = _address(properties, "oip_gateway_address", config)
    try:
        loopback = ipaddress.ip_address(listen[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise GatewayError(
            f"{config}: oip_gateway_address must be a loopback IP address (it has no TLS), got {listen[0]!r}"
        )
    return Settings(
        listen=listen,
        inference=_address(properties, "inference_address", config),
        management=_address(properties, "management_address", config),
        tokens=properties.get("disable_token_authorization", "false").lower() != "true",
        max_request_size=int(properties.get("max_request_size", DEFAULT_MAX_REQUEST_SIZE)),
    )


def _address(properties: Mapping[str, str], key: str, config: Path) -> tuple[str, int]:
    if key not in properties:
        raise GatewayError(f"{config}: no {key}")
    parts = urlsplit(properties[key])
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise GatewayError(f"{config}: {key} must be http://<host>:<port>, got {properties[key]!r}")
    return parts.hostname, parts.port


class Keys:
    """TorchServe's key_file.json, read on every use: TorchServe rewrites it when a key is rotated (POST /token)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: dict[str, Any] | None = None

    def current(self) -> dict[str, Any] | None:
        """The file's keys; the last complete read while TorchServe is halfway through rewriting it; None before
        it exists."""
        try:
            keys: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return self._last
        self._last = keys
        return keys

    def headers(self, api: str) -> dict[str, str]:
        """The Authorization header for the gateway's own calls to TorchServe's `api` (inference or management)."""
        keys = self.current()
        return {"Authorization": f"Bearer {keys[api]['key']}"} if keys else {}

    def refusal(self, authorization: str | None) -> tuple[int, dict[str, str]] | None:
        """Why a request's Authorization header does not pass TorchServe's inference check (status, v2 error),
        or None."""
        keys = self.current()
        if keys is None:
            return 503, {"error": f"TorchServe has written no key file at {self.path} yet; is it running?"}
        key = keys["inference"]["key"]
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return 400, {
                "error": "Token Authorization failed: send TorchServe's inference key (key_file.json, inference.key) "
                "as 'Authorization: Bearer <key>', as TorchServe's inference API requires"
            }
        expires = datetime.fromisoformat(keys["inference"]["expiration time"])
        if datetime.now(UTC) >= expires:
            return 400, {
                "error": f"Token Authorization failed: the inference key expired at {expires.isoformat()}; get a new "
                "one with POST /token?type=inference on the management API (authorised by the API key) and send that"
            }
        return None


def body_refusal(headers: Mapping[str, str], limit: int) -> tuple[int, str] | None:
    """(status, error) for a body the gateway will not read: chunked, or over `limit` bytes by its Content-Length.
    `headers` are a request's, by lower-case name. Refused before reading, so an oversized body is never sent.
    (h11 has already answered a malformed Content-Length with its own 400.)"""
    if "transfer-encoding" in headers:
        return 411, "send the body with a Content-Length; chunked bodies are not accepted"
    length = headers.get("content-length") or "0"
    if int(length) > limit:
        return 413, f"request body of {length} bytes is over TorchServe's max_request_size of {limit} bytes"
    return None


def forwarded_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A client's request headers as sent on to TorchServe: all but this connection's own and Host, Expect and
    Content-Length, which the gateway sets itself."""
    return [(name, value) for name, value in headers if name.decode("latin-1").lower() not in NOT_FORWARDED]


def request_start(headers: Mapping[str, str], now: float) -> list[tuple[bytes, bytes]]:
    """The `X-Request-Start` stamp of when the gateway received a request (`now`, epoch seconds), unless a proxy
    before it stamped one: the handler counts a request's deadline from it, TorchServe's queue included.
    `headers` are the request's, by lower-case name."""
    return [] if "x-request-start" in headers else [(b"x-request-start", f"t={now:.6f}".encode())]


def relayed_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """TorchServe's response headers as relayed to the client: all but its connection's own. Content-Length stays:
    the body is relayed byte for byte, still encoded as TorchServe sent it."""
    return [(name, value) for name, value in headers if name.decode("latin-1").lower() not in HOP_BY_HOP]


def parameter_header(name: str) -> str:
    """The header the handler reads request parameter `name` from (handlers/inputs/parameters.py PARAMETER_HEADERS)."""
    return "X-Ensemble-" + "-".join(part.capitalize() for part in name.split("_"))


def query_parameter_headers(query: str, headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The `X-Ensemble-*` headers that carry a `/predictions` query's parameters to the handler, those the request
    already has with the same value left out. `headers` are the request's, by lower-case name. Raise ParameterError
    for an unknown name, a value no header can carry, or a parameter given twice with different values."""
    pairs = parse_qsl(query, keep_blank_values=True)
    unknown = sorted({name for name, _ in pairs if name not in REQUEST_PARAMETERS})
    if unknown:
        raise ParameterError(unknown_parameters(unknown))
    values: dict[str, str] = {}
    for name, value in pairs:
        if not HEADER_VALUE.fullmatch(value):
            raise ParameterError(
                f"query parameter {name}={value!r} holds a character an HTTP header cannot carry (a control or "
                "non-ASCII character); send that parameter in the JSON body's parameters instead"
            )
        if values.setdefault(name, value) != value:
            raise ParameterError(f"{name} given twice with different values: {values[name]!r} and {value!r}")
    added = []
    for name, value in values.items():
        header = parameter_header(name)
        given = headers.get(header.lower())
        if given is None:
            added.append((header, value))
        elif given.strip() != value.strip():
            raise ParameterError(
                f"{name} given twice with different values: {value!r} (query) and {given.strip()!r} ({header} header)"
            )
    return added


def model_answer(
    name: str, requested: str | None, entry: Mapping[str, Any], *, ready: bool
) -> tuple[int, dict[str, Any]]:
    """(status, body) of a model route from TorchServe's description of the model (`GET /models/<name>`)."""
    if requested is not None and requested != entry["modelVersion"]:
        served = entry["modelVersion"]
        return 404, {"error": f"model {name!r} has version {served!r} (TorchServe's default), not {requested!r}"}
    if ready:
        healthy = sum(worker["status"] == "READY" for worker in entry["workers"])
        is_ready = healthy >= max(1, entry["minWorkers"])
        return (200 if is_ready else 400), {"name": name, "ready": is_ready}
    described = entry.get("customizedMetadata")
    # TorchServe passes the handler's describe on as JSON when it parses, else as the string it got.
    if isinstance(described, str):
        described = json.loads(described)
    tensors = described.get("v2_metadata") if isinstance(described, dict) else None
    if tensors is None:
        return 501, {
            "error": f"model {name!r} describes no v2 tensors (no v2_metadata in its describe): it is no ensemble "
            "archive, or one built before v2 metadata; rebuild it (make rebuild NAME=...)"
        }
    return 200, {
        "name": name,
        "versions": [entry["modelVersion"]],
        "platform": PLATFORM,
        "inputs": tensors["inputs"],
        "outputs": tensors["outputs"],
    }


def unknown_model(name: str, registered: Iterable[str]) -> str:
    """The 404's message for a model TorchServe does not have, naming those it has."""
    return f"unknown model {name!r}; registered: {', '.join(sorted(registered)) or 'none'}"


def torchserve_message(body: bytes, reason: str) -> str:
    """TorchServe's error message from its `{"code", "type", "message"}` body, or the raw body, or the reason."""
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace") or reason


class Gateway:
    """The ASGI application: the v2 routes answered here, every other request relayed to TorchServe's inference API
    through one pooled client (httpcore checks a pooled connection is still open before reusing it)."""

    def __init__(self, settings: Settings, keys: Keys | None, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.keys = keys
        self.client = client
        self.torchserve_version = metadata.version("torchserve")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn runs it with lifespan and websockets off: every scope is an HTTP request.
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        """A body refused unread, an own route answered, or the request forwarded."""
        refused = body_refusal(request.headers, self.settings.max_request_size)
        if refused is not None:
            return _json(refused[0], {"error": refused[1]}, close=True)
        path = _raw_path(request).decode("latin-1")
        if not path.startswith("/"):
            error = "the request target must be a path (origin-form); the gateway forwards to TorchServe only"
            return _json(400, {"error": error}, close=True)
        route = OWN_ROUTES.fullmatch(path)
        if route is None:
            return await self.forward(request)
        if request.method != "GET":
            return _json(405, {"error": f"{path} answers GET only"}, allow="GET")
        return _json(*await self.own(route, request.headers.get("authorization")))

    def _authorised(self, authorization: str | None) -> bool:
        return self.keys is None or self.keys.refusal(authorization) is None

    async def own(self, route: re.Match[str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        """(status, body) of a v2 health or metadata route, after TorchServe's inference token check."""
        if self.keys is not None:
            refusal = self.keys.refusal(authorization)
            if refusal is not None:
                return refusal
        if route["health"] is not None:
            return await self._health(route["health"])
        if route["model"] is None:
            return 200, {"name": SERVER_NAME, "version": self.torchserve_version, "extensions": []}
        name, requested = unquote(route["model"]), route["version"] and unquote(route["version"])
        return await self._model(name, requested, ready=route["ready"] is not None)

    async def _health(self, kind: str) -> tuple[int, dict[str, bool]]:
        try:
            ping = await self._get(self.settings.inference, "/ping", "inference")
        except httpx.TransportError as e:
            address = _where(self.settings.inference)
            log.warning("TorchServe's inference API at %s does not answer /ping: %r", address, e)
            return 400, {kind: False}
        if kind == "live":
            return 200, {"live": True}
        # TorchServe's /ping: 200 "Healthy" when every model has its minimum of healthy workers, else 500 "Unhealthy".
        return (200, {"ready": True}) if ping.status_code == 200 else (400, {"ready": False})

    async def _model(self, name: str, requested: str | None, *, ready: bool) -> tuple[int, dict[str, Any]]:
        """A model's readiness or metadata, for the version TorchServe serves it as by default: the one its
        `/v2/models/<name>/infer` reaches. (`GET /models/<name>/<version>` is no way to another one: where both
        APIs share a port, as in the KServe profile, TorchServe's inference handler answers that path 404.)"""
        path = f"/models/{quote(name, safe='')}" + ("" if ready else "?customized=true")
        try:
            reply = await self._get(self.settings.management, path, "management")
            if reply.status_code == 404:
                return 404, {"error": unknown_model(name, await self._registered())}
            if reply.status_code != 200:
                return reply.status_code, {"error": torchserve_message(reply.content, reply.reason_phrase)}
            return model_answer(name, requested, reply.json()[0], ready=ready)
        except (httpx.TransportError, ValueError, LookupError, TypeError) as e:
            address = _where(self.settings.management)
            log.warning("TorchServe's management API at %s gave no usable answer to %s: %r", address, path, e)
            return 502, {"error": f"TorchServe's management API at {address} gave no usable answer to {path}: {e!r}"}

    async def _registered(self) -> list[str]:
        """Every model TorchServe has registered, page by page."""
        names: list[str] = []
        token = ""
        while True:
            target = f"/models?limit=100&next_page_token={token}"
            page = (await self._get(self.settings.management, target, "management")).json()
            names += [model["modelName"] for model in page["models"]]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    async def _get(self, address: tuple[str, int], target: str, api: str) -> httpx.Response:
        """The gateway's own call to one of TorchServe's APIs, with that API's key."""
        headers = self.keys.headers(api) if self.keys is not None else {}
        return await self.client.get(_url(address, target.encode()), headers=headers)

    async def forward(self, request: Request) -> Response:
        """Relay the request to TorchServe's inference API and its answer back, both bodies streamed, every header
        but hop-by-hop ones kept; a `/predictions` query's parameters become the headers the handler reads."""
        raw_path, query = _raw_path(request), request.scope["query_string"]
        path = raw_path.decode("latin-1")
        headers = forwarded_headers(request.headers.raw)
        # A request whose token fails goes as it came: TorchServe refuses it, as it would refuse it directly.
        if query and PREDICTIONS.fullmatch(path) and self._authorised(request.headers.get("authorization")):
            try:
                added = query_parameter_headers(query.decode("latin-1"), request.headers)
            except ParameterError as e:
                return _json(400, {"code": 400, "type": "RequestError", "message": str(e)})
            headers += [(name.encode(), value.encode()) for name, value in added]
        headers += request_start(request.headers, time.time())
        length = int(request.headers.get("content-length") or 0)
        if length or request.method in WITH_BODY:
            headers.append((b"content-length", str(length).encode()))
        target = raw_path + b"?" + query if query else raw_path
        body = _body(request) if length else None
        upstream = httpx.Request(request.method, _url(self.settings.inference, target), headers=headers, content=body)
        address = _where(self.settings.inference)
        try:
            reply = await self.client.send(upstream, stream=True)
        except ClientDisconnect:
            # The client left halfway through its body: nobody reads this answer.
            return Response(status_code=400)
        except httpx.TimeoutException:
            error = f"TorchServe's inference API at {address} did not answer within {UPSTREAM_TIMEOUT_S} s"
            log.warning("%s %s: %s", request.method, path, error)
            return _json(504, {"error": error})
        except httpx.TransportError as e:
            log.warning("TorchServe at %s failed on %s %s: %r", address, request.method, path, e)
            return _json(502, {"error": f"TorchServe's inference API at {address} gave no answer: {e!r}"})
        # Closed once relayed, or once the client has gone (the background task runs either way).
        response = StreamingResponse(reply.aiter_raw(), reply.status_code, background=BackgroundTask(reply.aclose))
        response.raw_headers = relayed_headers(reply.headers.raw)
        return response


def _raw_path(request: Request) -> bytes:
    """The request's path as the client sent it, percent-encoded (ASGI's raw_path; a server that leaves the query
    on it, as httpx's in-process ASGITransport does, has it cut off)."""
    raw_path: bytes = request.scope["raw_path"]
    return raw_path.partition(b"?")[0]


def _where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _url(address: tuple[str, int], target: bytes) -> httpx.URL:
    """TorchServe's `address` with a request target as given: the path's percent-encoding kept as the client sent it."""
    return httpx.URL(scheme="http", host=address[0], port=address[1]).copy_with(raw_path=target)


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request's body as it arrives, for httpx to send on under the Content-Length the client gave."""
    async for chunk in request.stream():
        if chunk:
            yield chunk


def _json(status: int, doc: Mapping[str, Any], *, close: bool = False, allow: str | None = None) -> Response:
    """One of the gateway's own answers, with its Server and Date; `close` ends the connection (a body left unread)."""
    headers = {"Server": SERVER_HEADER, "Date": formatdate(usegmt=True)}
    if close:
        headers["Connection"] = "close"
    if allow is not None:
        headers["Allow"] = allow
    return JSONResponse(doc, status_code=status, headers=headers)


async def watch(torchserve: psutil.Process, server: uvicorn.Server) -> None:
    """Stop serving once the TorchServe frontend is gone, so a gateway never outlives the server it fronts."""
    while _alive(torchserve):
        await asyncio.sleep(WATCH_INTERVAL_S)
    log.info("TorchServe (pid %d) is gone; stopping", torchserve.pid)
    server.should_exit = True


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie: where PID 1 reaps nothing (some containers), a dead frontend stays a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def serve(settings: Settings, keys: Keys | None, torchserve: psutil.Process | None) -> None:
    """Serve until SIGTERM or SIGINT, or until `torchserve` ends."""
    limits = httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=UPSTREAM_IDLE_CONNECTIONS)
    # trust_env=False: no proxy, .netrc or certificate setting from the environment; TorchServe is reached directly.
    async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S, limits=limits, trust_env=False) as client:
        config = uvicorn.Config(
            Gateway(settings, keys, client),
            host=settings.listen[0],
            port=settings.listen[1],
            # h11 and asyncio, never httptools or uvloop even where installed: the parser and loop pinned here.
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            # The root logger's setup (main) stays; no access log: TorchServe's access_log.log has every forwarded
            # request, and health probes would flood it.
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=CLIENT_IDLE_TIMEOUT_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            backlog=LISTEN_BACKLOG,
        )
        server = uvicorn.Server(config)
        watcher = asyncio.create_task(watch(torchserve, server)) if torchserve is not None else None
        try:
            await server.serve()
        finally:
            if watcher is not None:
                watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    """Read the settings, then serve; a setting that cannot work exits with its message."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="TorchServe's config.properties")
    parser.add_argument(
        "--key-file",
        type=Path,
        default=Path("key_file.json"),
        help="TorchServe's key file (in the folder it was started from)",
    )
    parser.add_argument("--torchserve-pid", type=int, help="exit when this process (TorchServe's frontend) ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = read_settings(args.config)
        torchserve = psutil.Process(args.torchserve_pid) if args.torchserve_pid is not None else None
    except (GatewayError, ConfigError, psutil.Error) as e:
        raise SystemExit(f"gateway: {e}") from e
    log.info(
        "Open Inference Protocol gateway on http://%s:%d, forwarding to TorchServe at %s:%d (tokens %s)",
        *settings.listen,
        *settings.inference,
        "on" if settings.tokens else "off",
    )
    asyncio.run(serve(settings, Keys(args.key_file.resolve()) if settings.tokens else None, torchserve))


if __name__ == "__main__":
    main()
