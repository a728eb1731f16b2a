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
state and forwards every other request unchanged to TorchServe's inference address; one base URL
then serves v2 inference, v1 and `/predictions` too:

- `GET /v2/health/live`: 200 `{"live": true}` while TorchServe's inference API answers `/ping` at all.
- `GET /v2/health/ready`: 200 `{"ready": true}` while `/ping` says Healthy (every model has its
  minimum of healthy workers).
- `GET /v2`: `{"name": "ensemble-torchserve", "version": <TorchServe's>, "extensions": []}`.
- `GET /v2/models/<name>[/versions/<v>]/ready`: 200 `{"name", "ready": true}` while the model has at
  least max(1, minWorkers) READY workers, from the management API.
- `GET /v2/models/<name>[/versions/<v>]`: `{"name", "versions", "platform", "inputs", "outputs"}`,
  the tensors from the `v2_metadata` of the ensemble's describe (`?customized=true`).
  Both answer for the version TorchServe serves the model as by default; another `<v>` is a 404.

"False" is 400 with `{"live": false}` / `{"ready": false}`: the protocol says 200 means true and a 4xx
false, and Triton answers 400; `tritonclient` only checks for 200. An unknown model or version is
404 with `{"error": ...}` naming the registered models, or the version served.

Tokens: with TorchServe's token authorization on, these routes want `Authorization: Bearer <inference
key>` exactly as TorchServe's own inference API does (a missing or wrong one is TorchServe's 400); the
gateway reads the keys from TorchServe's key_file.json on every check, so rotated keys apply at once,
and calls the management API with the management key itself. Forwarded requests keep their own
headers: TorchServe checks their token.

Bounds: the gateway binds a loopback address only, connects to nothing but the configured TorchServe
addresses, refuses bodies over TorchServe's `max_request_size` (and chunked bodies) before reading
them, and, given `--torchserve-pid`, exits when that TorchServe process is gone.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psutil

SERVER_NAME = "ensemble-torchserve"
PLATFORM = "pytorch_torchserve"
# TorchServe's own default when config.properties sets none.
DEFAULT_MAX_REQUEST_SIZE = 6553500
# Longer than any model's response timeout we ship (60 s), so TorchServe, not the gateway, times a request out.
UPSTREAM_TIMEOUT_S = 300
# An idle client connection is closed after this long; it only holds a thread.
CLIENT_IDLE_TIMEOUT_S = 120
WATCH_INTERVAL_S = 1.0
# Headers of one connection (RFC 9110, 7.6.1), never relayed; the body is re-framed with its Content-Length.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length"}
)
# The client's Host names the gateway and its Expect was answered here; neither is forwarded.
NOT_FORWARDED = HOP_BY_HOP | {"host", "expect"}
OWN_ROUTES = re.compile(
    r"/v2(?:/health/(?P<health>live|ready)|/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<ready>/ready)?)?/?"
)

log = logging.getLogger("gateway")


class GatewayError(Exception):
    """A setting the gateway cannot run with; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    """What the gateway reads from TorchServe's config.properties: where to listen, where TorchServe is, its rules."""

    listen: tuple[str, int]
    inference: tuple[str, int]
    management: tuple[str, int]
    tokens: bool
    max_request_size: int


def read_properties(config: Path) -> dict[str, str]:
    """The `key=value` lines of a config.properties, comments left out (TorchServe's own format)."""
    pairs = (line.partition("=") for line in config.read_text().splitlines() if not line.lstrip().startswith(("#", "!")))
    return {name.strip(): value.strip() for name, sep, value in pairs if sep}


def read_settings(config: Path) -> Settings:
    """The gateway's settings from `config`; raise GatewayError for a missing or non-loopback gateway address."""
    properties = read_properties(config)
    if "oip_gateway_address" not in properties:
        raise GatewayError(f"{config}: no oip_gateway_address; add e.g. oip_gateway_address=http://127.0.0.1:8083")
    listen = _address(properties, "oip_gateway_address", config)
    try:
        loopback = ipaddress.ip_address(listen[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise GatewayError(f"{config}: oip_gateway_address must be a loopback IP address (it has no TLS), got {listen[0]!r}")
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
        """The file's keys; the last complete read while TorchServe is halfway through rewriting it; None before it exists."""
        try:
            keys = json.loads(self.path.read_text())
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
        """Why a request's Authorization header does not pass TorchServe's inference check (status, v2 error), or None."""
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
                "error": f"Token Authorization failed: the inference key expired at {expires.isoformat()}; get a new one with "
                "POST /token?type=inference on the management API (authorised by the API key) and send that"
            }
        return None


@dataclass(frozen=True)
class Reply:
    """One response read in full from TorchServe."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Upstream:
    """One keep-alive connection to a TorchServe API, for one client connection's thread; reopened when TorchServe closes it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.connection = http.client.HTTPConnection(*address, timeout=UPSTREAM_TIMEOUT_S)

    def request(self, method: str, target: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> Reply:
        """Send one request and read the whole response. A reused connection that fails (TorchServe closed it while
        idle) gets the request once more, on a fresh connection; a fresh one that fails raises."""
        headers = list(headers)
        while True:
            reused = self.connection.sock is not None
            try:
                self.connection.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers:
                    self.connection.putheader(name, value)
                if body or method in ("POST", "PUT", "PATCH"):
                    self.connection.putheader("Content-Length", str(len(body)))
                self.connection.endheaders(body or None)
                response = self.connection.getresponse()
                return Reply(response.status, response.reason, response.getheaders(), response.read())
            except ConnectionError:
                self.connection.close()
                if not reused:
                    raise
            except BaseException:
                self.connection.close()
                raise

    def close(self) -> None:
        self.connection.close()


class Gateway(ThreadingHTTPServer):
    """The listening server: a thread per client connection, each with its own connections to TorchServe."""

    request_queue_size = 128

    def __init__(self, settings: Settings, keys: Keys | None) -> None:
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(settings.listen[0]).version == 6 else socket.AF_INET
        self.settings = settings
        self.keys = keys
        self.torchserve_version = metadata.version("torchserve")
        super().__init__(settings.listen, Handler)


class Handler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1, keep-alive): the gateway's own routes, or a relay to TorchServe."""

    protocol_version = "HTTP/1.1"
    server_version = "ensemble-oip-gateway"
    timeout = CLIENT_IDLE_TIMEOUT_S
    server: Gateway

    def setup(self) -> None:
        super().setup()
        self.inference = Upstream(self.server.settings.inference)
        self.management = Upstream(self.server.settings.management)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.inference.close()
            self.management.close()

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        if self._refused_body():
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        """Every method: read the body (bounded), then answer an own route or relay to TorchServe."""
        if self._refused_body():
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        if not self.path.startswith("/"):
            self.close_connection = True
            self._json(400, {"error": "the request target must be a path (origin-form); the gateway forwards to TorchServe only"})
            return
        route = OWN_ROUTES.fullmatch(self.path.partition("?")[0])
        if route is None:
            self._forward(body)
        elif self.command != "GET":
            self._json(405, {"error": f"{self.path.partition('?')[0]} answers GET only"}, [("Allow", "GET")])
        else:
            self._json(*self._own(route))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch

    def _refused_body(self) -> bool:
        """Answer a body the gateway will not read (chunked, unparseable length, over max_request_size); True if refused."""
        if "Transfer-Encoding" in self.headers:
            status, error = 411, "send the body with a Content-Length; chunked bodies are not accepted"
        else:
            length = self.headers.get("Content-Length") or "0"
            limit = self.server.settings.max_request_size
            if not length.isdigit():
                status, error = 400, f"invalid Content-Length {length!r}"
            elif int(length) > limit:
                status, error = 413, f"request body of {length} bytes is over TorchServe's max_request_size of {limit} bytes"
            else:
                return False
        self.close_connection = True
        self._json(status, {"error": error})
        return True

    def _own(self, route: re.Match[str]) -> tuple[int, dict[str, Any]]:
        """(status, body) of a v2 health or metadata route, after TorchServe's inference token check."""
        if self.server.keys is not None:
            refusal = self.server.keys.refusal(self.headers.get("Authorization"))
            if refusal is not None:
                return refusal
        if route["health"] is not None:
            return self._health(route["health"])
        if route["model"] is None:
            return 200, {"name": SERVER_NAME, "version": self.server.torchserve_version, "extensions": []}
        name, requested = unquote(route["model"]), route["version"] and unquote(route["version"])
        return self._model(name, requested, ready=route["ready"] is not None)

    def _health(self, kind: str) -> tuple[int, dict[str, bool]]:
        headers = self.server.keys.headers("inference") if self.server.keys is not None else {}
        try:
            ping = self.inference.request("GET", "/ping", headers=headers.items())
        except (OSError, http.client.HTTPException) as e:
            log.warning("TorchServe's inference API at %s:%d does not answer /ping: %s", *self.server.settings.inference, e)
            return 400, {kind: False}
        if kind == "live":
            return 200, {"live": True}
        # TorchServe's /ping: 200 "Healthy" when every model has its minimum of healthy workers, else 500 "Unhealthy".
        return (200, {"ready": True}) if ping.status == 200 else (400, {"ready": False})

    def _model(self, name: str, requested: str | None, *, ready: bool) -> tuple[int, dict[str, Any]]:
        """A model's readiness or metadata, for the version TorchServe serves it as by default: the one its
        `/v2/models/<name>/infer` reaches. (`GET /models/<name>/<version>` is no way to another one: where both
        APIs share a port, as in the KServe profile, TorchServe's inference handler answers that path 404.)"""
        path = f"/models/{quote(name, safe='')}" + ("" if ready else "?customized=true")
        try:
            reply = self._manage(path)
            if reply.status == 404:
                return 404, {"error": self._unknown(name)}
            if reply.status != 200:
                return reply.status, {"error": _torchserve_message(reply)}
            return _model_answer(name, requested, reply.json()[0], ready=ready)
        except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as e:
            address = "%s:%d" % self.server.settings.management
            log.warning("TorchServe's management API at %s gave no usable answer to %s: %r", address, path, e)
            return 502, {"error": f"TorchServe's management API at {address} gave no usable answer to {path}: {e!r}"}

    def _unknown(self, name: str) -> str:
        """The 404's message, naming the models TorchServe has registered."""
        names: list[str] = []
        token = ""
        while True:
            page = self._manage(f"/models?limit=100&next_page_token={token}").json()
            names += [model["modelName"] for model in page["models"]]
            token = page.get("nextPageToken", "")
            if not token:
                return f"unknown model {name!r}; registered: {', '.join(sorted(names)) or 'none'}"

    def _manage(self, path: str) -> Reply:
        headers = self.server.keys.headers("management") if self.server.keys is not None else {}
        return self.management.request("GET", path, headers=headers.items())

    def _forward(self, body: bytes) -> None:
        """Relay the request to TorchServe's inference API and its answer back, unchanged but for hop-by-hop headers."""
        headers = [(name, value) for name, value in self.headers.items() if name.lower() not in NOT_FORWARDED]
        address = "%s:%d" % self.server.settings.inference
        try:
            reply = self.inference.request(self.command, self.path, body, headers)
        except TimeoutError:
            log.warning("TorchServe at %s did not answer %s %s within %d s", address, self.command, self.path, UPSTREAM_TIMEOUT_S)
            self._json(504, {"error": f"TorchServe's inference API at {address} did not answer within {UPSTREAM_TIMEOUT_S} s"})
            return
        except (OSError, http.client.HTTPException) as e:
            log.warning("TorchServe at %s failed on %s %s: %s", address, self.command, self.path, e)
            self._json(502, {"error": f"TorchServe's inference API at {address} gave no answer: {e}"})
            return
        relayed = [(name, value) for name, value in reply.headers if name.lower() not in HOP_BY_HOP]
        if self.command == "HEAD":
            relayed += [(name, value) for name, value in reply.headers if name.lower() == "content-length"]
        # TorchServe's own header lines only: no Server or Date of ours on its answer.
        self.send_response_only(reply.status, reply.reason)
        self._send(relayed, reply.body)

    def _json(self, status: int, doc: Mapping[str, Any], headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self._send([("Content-Type", "application/json"), *headers], json.dumps(doc).encode())

    def _send(self, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """The rest of a response after its status line: headers, framing, and the body (none for HEAD)."""
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        """The Server header: our name, not the Python version."""
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log: TorchServe's access_log.log has every forwarded request, and health probes would flood it."""

    def log_message(self, fmt: str, *args: Any) -> None:
        log.warning("%s: " + fmt, self.address_string(), *args)


def _model_answer(name: str, requested: str | None, entry: Mapping[str, Any], *, ready: bool) -> tuple[int, dict[str, Any]]:
    """(status, body) of a model route from TorchServe's description of the model (`GET /models/<name>`)."""
    if requested is not None and requested != entry["modelVersion"]:
        return 404, {"error": f"model {name!r} has version {entry['modelVersion']!r} (TorchServe's default), not {requested!r}"}
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


def _torchserve_message(reply: Reply) -> str:
    """TorchServe's error message from its `{"code", "type", "message"}` body, or the raw body."""
    try:
        return str(reply.json()["message"])
    except (ValueError, KeyError, TypeError):
        return reply.body.decode(errors="replace") or reply.reason


def watch(torchserve: psutil.Process, gateway: Gateway) -> None:
    """Stop serving once the TorchServe frontend is gone, so a gateway never outlives the server it fronts."""
    while _alive(torchserve):
        time.sleep(WATCH_INTERVAL_S)
    log.info("TorchServe (pid %d) is gone; stopping", torchserve.pid)
    gateway.shutdown()


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie: where PID 1 reaps nothing (some containers), a dead frontend stays a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="TorchServe's config.properties")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key file (in the folder it was started from)")
    parser.add_argument("--torchserve-pid", type=int, help="exit when this process (TorchServe's frontend) ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = read_settings(args.config)
        torchserve = psutil.Process(args.torchserve_pid) if args.torchserve_pid is not None else None
    except (GatewayError, OSError, psutil.Error) as e:
        raise SystemExit(f"gateway: {e}") from e
    gateway = Gateway(settings, Keys(args.key_file.resolve()) if settings.tokens else None)
    if torchserve is not None:
        threading.Thread(target=watch, args=(torchserve, gateway), name="watch-torchserve", daemon=True).start()
    log.info(
        "Open Inference Protocol gateway on http://%s:%d, forwarding to TorchServe at %s:%d (tokens %s)",
        *settings.listen, *settings.inference, "on" if settings.tokens else "off",
    )
    with gateway:
        gateway.serve_forever()


if __name__ == "__main__":
    main()
