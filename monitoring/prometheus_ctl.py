"""Start and stop the Prometheus that `make` unpacked into .tools/prometheus, and query it.

Usage: python -m monitoring.prometheus_ctl {start,stop,status}

`start` runs Prometheus in the background with monitoring/prometheus.yml, listening on 127.0.0.1:9090
only and keeping its data and a pid file under logs/prometheus/, waits for /-/ready, then prints the
URL, whether it reaches TorchServe's metrics endpoint, and a few queries to try. `stop` ends the
process the pid file names (after checking it is that Prometheus). The tests use the functions:
`start` / `stop` on a `Prometheus` handle, `query`, and `write_test_config` for a copy of the shipped
config pointed at their own TorchServe.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "prometheus"
PROMETHEUS = TOOLS / "usr" / "bin" / "prometheus"
PROMTOOL = TOOLS / "usr" / "bin" / "promtool"
CONFIG = ROOT / "monitoring" / "prometheus.yml"
ALERTS = ROOT / "monitoring" / "alerts.yml"
DATA_DIR = ROOT / "logs" / "prometheus"
LISTEN = "127.0.0.1:9090"
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
QUERY_TIMEOUT_S = 10
EXAMPLES = {
    "requests/s by policy": "sum by (ModelName, Policy) (rate(ensemble_requests_total[1m]))",
    "ms per image, by member": "1000 * sum by (ModelName, Member) (rate(ensemble_member_forward_seconds_total[5m])) "
    "/ sum by (ModelName, Member) (rate(ensemble_member_images_total[5m]))",
    "disagreement rate": "sum by (ModelName) (rate(ensemble_disagreements_total[5m])) "
    "/ sum by (ModelName) (rate(ensemble_images_total[5m]))",
    "refusals/s by type": "sum by (ModelName, ErrorType) (rate(ensemble_errors_total[1m]))",
    "TorchServe's own count": "sum by (model_name) (ts_inference_requests_total)",
}


class PrometheusError(RuntimeError):
    """Prometheus could not start, or refused a query (the message is Prometheus's own)."""


@dataclass
class Prometheus:
    """A Prometheus this process started: its process and the base URL of its HTTP API."""

    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path


def require_tools() -> None:
    """Fail with the command that provides the binaries, rather than a bare FileNotFoundError."""
    for binary in (PROMETHEUS, PROMTOOL):
        if not binary.is_file():
            raise PrometheusError(
                f"{binary.relative_to(ROOT)} is missing: "
                "run `make prometheus` (Debian's package, unpacked into .tools/)"
            )


def command(config: Path, data_dir: Path, listen: str) -> list[str]:
    """Prometheus's command line: loopback listener, our data folder, no admin or lifecycle API.

    Prometheus answers CORS requests from any origin by default (`--web.cors.origin=.*`), which would let
    any web page open in a browser on this machine read the API; only its own origin is allowed here.
    Debian's build looks for its web assets under /usr/share; they are in .tools/prometheus instead.
    """
    return [
        str(PROMETHEUS),
        f"--config.file={config.resolve()}",
        f"--storage.tsdb.path={data_dir.resolve()}",
        "--storage.tsdb.retention.time=15d",
        "--storage.tsdb.retention.size=1GB",
        f"--web.listen-address={listen}",
        f"--web.cors.origin={re.escape(f'http://{listen}')}",
        f"--web.local-assets={TOOLS / 'usr' / 'share' / 'prometheus' / 'web'}/",
        f"--web.console.templates={TOOLS / 'etc' / 'prometheus' / 'consoles'}",
        f"--web.console.libraries={TOOLS / 'etc' / 'prometheus' / 'console_libraries'}",
    ]


def start(
    config: Path = CONFIG,
    data_dir: Path = DATA_DIR,
    listen: str = LISTEN,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    detach: bool = False,
) -> Prometheus:
    """Start Prometheus in the background and wait until /-/ready answers; raise with its log's tail if it exits.

    `detach` puts it in its own session, so it outlives the caller (`make monitor`) and a Ctrl-C there.
    Its output goes to prometheus.log in `data_dir`, never to our stdout: a caller reading our output
    through a pipe would otherwise wait for Prometheus to exit.
    """
    require_tools()
    host, _, port = listen.rpartition(":")
    if host != "127.0.0.1":
        raise PrometheusError(
            f"refusing to listen on {listen}: Prometheus has no authentication; keep it on 127.0.0.1 (SECURITY.md)"
        )
    # Another server answering /-/ready there (an older Prometheus) would pass for ours while ours fails to bind.
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        raise PrometheusError(
            f"something already listens on {listen}: stop it (`make monitor-stop`) or choose another address"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "prometheus.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            command(config, data_dir, listen),
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    prometheus = Prometheus(process=process, url=f"http://{listen}", data_dir=data_dir, log=log)
    try:
        wait_ready(prometheus, timeout_s)
    except BaseException:
        stop(prometheus)
        raise
    return prometheus


def wait_ready(prometheus: Prometheus, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll /-/ready until it answers 200, the process exits, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if prometheus.process.poll() is not None:
            raise PrometheusError(
                f"Prometheus exited with {prometheus.process.returncode}:\n{log_tail(prometheus.log)}"
            )
        try:
            if requests.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise PrometheusError(
        f"Prometheus not ready at {prometheus.url} after {timeout_s:.0f} s:\n{log_tail(prometheus.log)}"
    )


def stop(prometheus: Prometheus, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Terminate (Prometheus flushes its head block on SIGTERM), wait, kill if it hangs; return its exit code."""
    if prometheus.process.poll() is None:
        prometheus.process.terminate()
        try:
            prometheus.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            prometheus.process.kill()
            prometheus.process.wait(timeout_s)
    return prometheus.process.returncode


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _api(base_url: str, path: str, params: dict[str, Any], timeout_s: float) -> Any:
    """GET an /api/v1 endpoint and return its `data`; Prometheus's error message on a bad query."""
    response = requests.get(f"{base_url}/api/v1/{path}", params=params, timeout=timeout_s)
    try:
        body = response.json()
    except ValueError:
        response.raise_for_status()
        raise PrometheusError(f"{path}: not JSON: {response.text[:200]}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{path} {params.get('query')!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(
    base_url: str, promql: str, *, at: float | None = None, timeout_s: float = QUERY_TIMEOUT_S
) -> list[dict[str, Any]]:
    """An instant query: the result's series, each `{"metric": {...}, "value": [time, "text"]}`.

    A scalar or string result comes back as one series without labels, so callers handle one shape.
    """
    params: dict[str, Any] = {"query": promql}
    if at is not None:
        params["time"] = at
    data = _api(base_url, "query", params, timeout_s)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def query_range(
    base_url: str, promql: str, *, start: float, end: float, step_s: float, timeout_s: float = QUERY_TIMEOUT_S
) -> list[dict[str, Any]]:
    """A range query: the result's series, each `{"metric": {...}, "values": [[time, "text"], ...]}`."""
    data = _api(base_url, "query_range", {"query": promql, "start": start, "end": end, "step": step_s}, timeout_s)
    return data["result"]


def write_test_config(
    path: Path,
    *,
    target: str,
    interval: str = "1s",
    job: str = "torchserve",
    rules: Sequence[Path] = (ALERTS,),
) -> Path:
    """A copy of monitoring/prometheus.yml that scrapes `target` (host:port) as `job` every `interval`.

    For tests: their TorchServe listens on shifted ports (e.g. metrics on 127.0.0.1:18182) and they
    want samples every second. Rules are evaluated at the same interval; their paths are made absolute,
    since Prometheus reads rule files relative to the config's folder. Returns `path`.
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(Path(rule).resolve()) for rule in rules]
    [scrape] = config["scrape_configs"]
    scrape["job_name"] = job
    scrape["static_configs"] = [{"targets": [target]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# The command line of `make monitor` / `make monitor-stop`: a pid file instead of a Popen handle.


def pid_file(data_dir: Path) -> Path:
    return data_dir / "prometheus.pid"


def running(data_dir: Path) -> psutil.Process | None:
    """The Prometheus the pid file names, if that process is still our binary on this data folder."""
    try:
        process = psutil.Process(int(pid_file(data_dir).read_text().strip()))
        cmdline = process.cmdline()
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    if cmdline[:1] == [str(PROMETHEUS)] and f"--storage.tsdb.path={data_dir.resolve()}" in cmdline:
        return process
    return None


def stop_pid(data_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the Prometheus of the pid file; False if none was running. The pid file goes either way."""
    process = running(data_dir)
    if process is not None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
    pid_file(data_dir).unlink(missing_ok=True)
    return process is not None


def scrape_health(base_url: str, job: str = "torchserve", timeout_s: float = 12) -> list[dict[str, Any]]:
    """`up` of the job's targets once Prometheus has scraped them once (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(base_url, f'up{{job="{job}"}}')
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="TSDB folder, log and pid file")
    parser.add_argument("--listen", default=LISTEN)
    args = parser.parse_args()
    url = f"http://{args.listen}"
    if args.action == "stop":
        print("Prometheus stopped" if stop_pid(args.data) else "no Prometheus running")
        return
    if args.action == "status":
        process = running(args.data)
        print(f"Prometheus running (pid {process.pid}) at {url}" if process else "no Prometheus running")
        sys.exit(0 if process else 1)
    if running(args.data) is not None:
        raise SystemExit(f"a Prometheus already runs on {args.data}: `make monitor-stop` first")
    try:
        prometheus = start(args.config, args.data, args.listen, detach=True)
    except PrometheusError as error:
        raise SystemExit(str(error)) from None
    pid_file(args.data).write_text(f"{prometheus.process.pid}\n")
    print(
        f"Prometheus is up at {url} (pid {prometheus.process.pid}, data and log in {args.data}); "
        f"graphs at {url}/classic/graph"
    )
    for target in scrape_health(url):
        state = "up" if target["value"][1] == "1" else "DOWN (is TorchServe running? `make serve`)"
        print(f"  scraping {target['metric'].get('instance')}/metrics: {state}")
    print("Try (ensemble_* series appear once the ensembles have answered requests):")
    for title, promql in EXAMPLES.items():
        print(f"  {title}:\n    curl -s {url}/api/v1/query --data-urlencode 'query={promql}'")


if __name__ == "__main__":
    main()
