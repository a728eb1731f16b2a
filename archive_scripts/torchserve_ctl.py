"""Start and stop TorchServe, and register ensembles through its management API with the real token.

Usage: python -m archive_scripts.torchserve_ctl {start,stop,register,unregister,curl} [NAME ...]

`start` runs `torchserve --start` with config.properties and waits for /ping (which needs the
inference token too, unless the config disables tokens, as the KServe profile does), then starts the
Open Inference Protocol gateway (`gateway/open_inference.py`, on `oip_gateway_address`) and waits until it
answers; `stop` stops both. `register` posts each archive of model_store to the management API (token
from key_file.json, written by TorchServe in the folder it was started from) and waits until its workers
are up; `curl` prints a ready-to-paste request. Every address is read from config.properties, all of
them loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from archive_scripts.waiting import wait_for
from handlers.config.files import load_ensembles, read_properties

READY_TIMEOUT_S = 120
GATEWAY_TIMEOUT_S = 30
ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config.properties"
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
DEMO_SAMPLES = {
    "shapes": "artifacts/samples/present.png",
    "multishape": "artifacts/samples/multi-triangle-disc-cross.png",
    "faces": "artifacts/samples/face.png",
    "digits": "artifacts/samples/digit-7.png",
}


@dataclass(frozen=True)
class Server:
    """Where one TorchServe instance listens and keeps its key file, read from its config.properties.

    `tmpdir`, when set, gives the instance its own temp folder: TorchServe keeps its PID file there, and
    so does the gateway, so a second instance (the tests') never collides with one started by `make serve`.
    """

    config: Path
    workdir: Path
    tmpdir: Path | None = None

    def setting(self, key: str) -> str:
        """`key`'s value as TorchServe reads it from the config; KeyError when the config does not set it."""
        try:
            return read_properties(self.config)[key]
        except KeyError:
            raise KeyError(f"{self.config}: no {key}") from None

    @property
    def inference(self) -> str:
        return self.setting("inference_address")

    @property
    def management(self) -> str:
        return self.setting("management_address")

    @property
    def gateway(self) -> str | None:
        """The Open Inference Protocol gateway's URL (`oip_gateway_address`).

        None when the config asks for no gateway.
        """
        try:
            return self.setting("oip_gateway_address")
        except KeyError:
            return None

    @property
    def torchserve_pid_file(self) -> Path:
        """Where `torchserve --start` writes the frontend's pid: its temp folder."""
        return (self.tmpdir or Path(tempfile.gettempdir())) / ".model_server.pid"

    @property
    def gateway_pid_file(self) -> Path:
        """Next to TorchServe's pid file, so a gateway pairs with its TorchServe as the temp folders do."""
        return (self.tmpdir or Path(tempfile.gettempdir())) / ".oip_gateway.pid"

    def env(self) -> dict[str, str]:
        logs = str(self.workdir / "logs")
        env = {**os.environ, "LOG_LOCATION": logs, "METRICS_LOCATION": logs}
        if self.tmpdir is not None:
            self.tmpdir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.tmpdir)
        return env

    @property
    def tokens(self) -> bool:
        """Whether TorchServe enforces tokens (its default); without them it writes no key file and wants no header."""
        try:
            return self.setting("disable_token_authorization").lower() != "true"
        except KeyError:
            return True

    def key(self, api: str) -> str:
        """The current key for `api` (inference, management or API) from TorchServe's key file."""
        return json.loads((self.workdir / "key_file.json").read_text())[api]["key"]

    def headers(self, api: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(api)}"} if self.tokens else {}


def private_server(
    workdir: Path, model_store: Path, *, port_offset: int, overrides: Mapping[str, str] | None = None
) -> Server:
    """A Server running the shipped config.properties with shifted ports, its own store, folder and temp dir.

    Tests and benchmarks use it so that they never touch an instance started by `make serve`.
    `overrides` replaces (or adds) settings, e.g. a short `token_expiration_min` for a fault test.
    """
    config = SHIPPED_CONFIG.read_text()
    config = re.sub(r"(?m)^model_store=.*$", f"model_store={model_store.resolve()}", config)
    config = re.sub(
        r"(?m)^metrics_config=(.*)$",
        lambda m: f"metrics_config={(SHIPPED_CONFIG.parent / m.group(1)).resolve()}",
        config,
    )
    for key, value in (overrides or {}).items():
        config, found = re.subn(rf"(?m)^{re.escape(key)}=.*$", f"{key}={value}", config)
        if not found:
            config += f"{key}={value}\n"

    def shifted(port: re.Match[str]) -> str:
        return f"{port.group(1)}{int(port.group(2)) + port_offset}"

    config = re.sub(r"(?m)^(\w+(?:_address|_port)=(?:.*:)?)(\d+)$", shifted, config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.properties").write_text(config)
    return Server(config=workdir / "config.properties", workdir=workdir, tmpdir=workdir / "tmp")


def start(server: Server, model_store: Path) -> None:
    """Start TorchServe in the background and wait until /ping answers; then the gateway, when the config names one."""
    (server.workdir / "key_file.json").unlink(missing_ok=True)
    (server.workdir / "logs").mkdir(exist_ok=True)
    # The Java frontend inherits the launcher's output streams and outlives it: give it a file, never
    # our stdout, or a caller reading our output through a pipe would wait for TorchServe to exit.
    with (server.workdir / "logs" / "torchserve.out").open("ab") as out:
        subprocess.run(
            [
                _binary(),
                "--start",
                "--ts-config",
                str(server.config.resolve()),
                "--model-store",
                str(model_store.resolve()),
                "--log-config",
                str(LOG_CONFIG),
                "--ncs",
            ],
            cwd=server.workdir,
            env=server.env(),
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_for_ping(server)
    if server.gateway is not None:
        start_gateway(server)


def _wait_for_ping(server: Server) -> None:
    def healthy() -> bool:
        if server.tokens and not (server.workdir / "key_file.json").exists():
            return False
        try:
            return requests.get(f"{server.inference}/ping", headers=server.headers("inference"), timeout=2).ok
        except (requests.RequestException, ValueError, KeyError):  # Not listening yet, or too busy to answer in 2 s.
            return False

    try:
        wait_for(healthy, "TorchServe answering /ping", READY_TIMEOUT_S, every_s=0.5)
    except TimeoutError as e:
        raise SystemExit(f"{e}; see {server.workdir / 'logs'}") from e


def stop(server: Server) -> None:
    """Stop the gateway, then TorchServe."""
    stop_gateway(server)
    subprocess.run([_binary(), "--stop"], cwd=server.workdir, env=server.env(), check=False, stdout=subprocess.DEVNULL)


# Gateways this process started, by pid file: stop_gateway reaps them, or each would stay a zombie (and
# warn when collected) until this process exits. `make stop` ends one started by an earlier `make serve`.
_STARTED: dict[Path, subprocess.Popen[bytes]] = {}


def start_gateway(server: Server) -> None:
    """Start the gateway for the running TorchServe of `server` and wait until it answers.

    It runs in its own session with no stdin and its output in logs/gateway.log, so it outlives the caller
    (`make serve`) and a Ctrl-C there; it stops by itself when that TorchServe's frontend ends.
    """
    address = server.gateway
    if address is None:
        raise SystemExit(f"{server.config} sets no oip_gateway_address: there is no gateway to start")
    listen = urlsplit(address)
    # Another server answering there (a gateway left from elsewhere) would pass for ours while ours fails to bind.
    with contextlib.suppress(OSError), socket.create_connection((listen.hostname, listen.port), timeout=1):
        raise SystemExit(
            f"something already listens on {address} (oip_gateway_address): "
            "stop it (`make stop`) or choose another address"
        )
    torchserve_pid = server.torchserve_pid_file.read_text().strip()
    log = server.workdir / "logs" / "gateway.log"
    command = [
        sys.executable,
        "-m",
        "gateway.open_inference",
        "--config",
        str(server.config.resolve()),
        "--key-file",
        str((server.workdir / "key_file.json").resolve()),
        "--torchserve-pid",
        torchserve_pid,
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _STARTED[server.gateway_pid_file] = process
    server.gateway_pid_file.write_text(f"{process.pid}\n")

    def live() -> bool:
        if process.poll() is not None:
            stop_gateway(server)
            raise SystemExit(f"the gateway exited with {process.returncode}; see {log}")
        try:
            url = f"{address}/v2/health/live"
            return requests.get(url, headers=server.headers("inference"), timeout=2).status_code == 200
        except requests.RequestException:  # Not listening yet, or too busy to answer in 2 s.
            return False

    try:
        wait_for(live, f"the gateway answering on {address}", GATEWAY_TIMEOUT_S, every_s=0.1)
    except TimeoutError as e:
        stop_gateway(server)
        raise SystemExit(f"{e}; see {log}") from e


def stop_gateway(server: Server) -> bool:
    """Stop the gateway the pid file names (after checking it is one); False if none was running.

    The pid file goes either way.
    """
    pid_file = server.gateway_pid_file
    try:
        process = psutil.Process(int(pid_file.read_text()))
        ours = "gateway.open_inference" in process.cmdline()
    except (FileNotFoundError, ValueError, psutil.Error):
        process, ours = None, False
    if ours and process is not None:
        process.terminate()
        try:
            process.wait(GATEWAY_TIMEOUT_S)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(GATEWAY_TIMEOUT_S)
    started = _STARTED.pop(pid_file, None)
    if started is not None:
        started.wait(GATEWAY_TIMEOUT_S)
    pid_file.unlink(missing_ok=True)
    return ours


def _binary() -> str:
    """The torchserve launcher of the interpreter running this script (the project's venv)."""
    return shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"


def register(server: Server, name: str, workers: int, **batching: int) -> dict:
    """Register model_store/<name>.mar and wait for its workers; raise with TorchServe's message on failure.

    `batching` (batch_size, max_batch_delay) overrides the archive's model-config.yaml.
    """
    params: dict[str, str | int] = {"url": f"{name}.mar", "initial_workers": workers, "synchronous": "true", **batching}
    response = requests.post(
        f"{server.management}/models",
        params=params,
        headers=server.headers("management"),
        timeout=READY_TIMEOUT_S,
    )
    if not response.ok:
        raise SystemExit(f"registering {name} failed ({response.status_code}): {response.text.strip()}")
    return response.json()


def unregister(server: Server, name: str) -> None:
    response = requests.delete(f"{server.management}/models/{name}", headers=server.headers("management"), timeout=60)
    if not response.ok:
        raise SystemExit(f"unregistering {name} failed ({response.status_code}): {response.text.strip()}")


def curl_example(server: Server, name: str) -> str:
    sample = DEMO_SAMPLES.get(name, DEMO_SAMPLES["shapes"])
    return (
        'curl -s -H "Authorization: Bearer '
        "$(python3 -c \"import json;print(json.load(open('key_file.json'))['inference']['key'])\")\" "
        f"-H 'Content-Type: image/png' --data-binary @{sample} {server.inference}/predictions/{name}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "register", "unregister", "curl"])
    parser.add_argument("names", nargs="*", help="ensembles (default: every ensemble in ensembles.yaml)")
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--ensembles", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    args = parser.parse_args()
    server = Server(config=args.config, workdir=Path.cwd())
    if args.action == "start":
        start(server, args.store)
        gateway = f", Open Inference Protocol gateway {server.gateway}" if server.gateway else ""
        print(f"TorchServe is up: inference {server.inference}, management {server.management}{gateway}")
    elif args.action == "stop":
        stop(server)
    else:
        specs = load_ensembles(args.ensembles, check_files=False)
        for name in args.names or list(specs):
            if args.action == "register":
                print(register(server, name, specs[name].batching.workers)["status"])
            elif args.action == "unregister":
                unregister(server, name)
                print(f"unregistered {name}")
            else:
                print(curl_example(server, name))


if __name__ == "__main__":
    main()
