"""Reliability suite: bad inputs, injected faults, and load, against real TorchServe instances on 127.0.0.1.

Usage: python -m bench.reliability [--full] [--out PATH]   (`make reliability`, `make reliability-full`)

Two private TorchServe instances run the shipped config.properties with shifted ports. The main one
serves a small binary ensemble `rel` (and `hang`, whose second member hangs on an all-white image);
the edge one serves `rel` with a queue of 4 jobs and 1-minute keys, for the overload and token
sections. Every request of every section is counted: sent, answered with which status, lost (no HTTP
answer at all), and unexpected 5xx (a 5xx outside a fault's own window). The short mode takes about
a minute and a half and is what `tests/test_reliability.py` runs; `--full` soaks for ten minutes. Prints a
table and writes bench/results/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
import torch
import yaml

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, start, stop
from bench.bad_inputs import BadInput, catalogue, encoded, photo
from bench.loadgen import p50_p99_ms
from bench.reliability_models import HangingNet, SmallNet
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results" / "reliability.json"
CLIENT_TIMEOUT_S = 30
MAX_IMAGES = 8
HANG_TIMEOUT_S = 4
KILL_CLIENTS = 4
EDGE_QUEUE = 4


@dataclass(frozen=True)
class Mode:
    """How long and how hard each load section runs."""

    name: str
    soak_s: float
    soak_warmup_s: float
    overload_s: float


QUICK = Mode("short", soak_s=20, soak_warmup_s=5, overload_s=5)
FULL = Mode("full", soak_s=600, soak_warmup_s=60, overload_s=30)


@dataclass
class Ledger:
    """Every request the suite sent: how it was answered, and which 5xx were not expected."""

    sent: int = 0
    lost: int = 0
    unexpected_5xx: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, url: str, *, expect_5xx: bool = False, **kwargs: Any) -> requests.Response | None:
        """POST and record; None when no HTTP answer came back (a lost request)."""
        with self.lock:
            self.sent += 1
        try:
            response = requests.post(url, timeout=CLIENT_TIMEOUT_S, **kwargs)
        except requests.RequestException:
            with self.lock:
                self.lost += 1
            return None
        with self.lock:
            key = str(response.status_code)
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if response.status_code >= 500 and not expect_5xx:
                self.unexpected_5xx += 1
        return response


@dataclass(frozen=True)
class Workspace:
    """Built archives in a model store, plus the in-process reference of `rel`."""

    store: Path
    reference: Ensemble
    reference_v3: Ensemble


def ensemble_doc(version: str, members: list[tuple[str, str]], timeout_s: int = 30) -> dict[str, Any]:
    return {
        "version": version,
        "task": "binary",
        "labels": ["absent", "present"],
        "positive_label": "present",
        "policy": {"name": "mean"},
        "input": {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "limits": {"max_images_per_request": MAX_IMAGES, "formats": ["JPEG", "PNG", "GIF"]},
        "batching": {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 1, "response_timeout_s": timeout_s},
        "members": [
            {
                "name": name,
                "arch": f"reliability_models.py:{cls}",
                "kwargs": {"num_classes": 2},
                "weights": f"{name}.pt",
            }
            for name, cls in members
        ],
    }


def build_workspace(folder: Path) -> Workspace:
    """rel 1.0 (rel.mar), rel 3.0 (rel-v3.mar), rel 2.0 with a member changed after the build (rel-broken.mar), hang."""
    store = folder / "model_store"
    specs = {}
    for tag, version, seed in (("v1", "1.0", 1), ("v2", "2.0", 2), ("v3", "3.0", 3)):
        source = folder / tag
        source.mkdir(parents=True)
        shutil.copyfile(Path(__file__).parent / "reliability_models.py", source / "reliability_models.py")
        torch.manual_seed(seed)
        for member in ("a", "b"):
            torch.save(SmallNet(num_classes=2).state_dict(), source / f"{member}.pt")
        torch.save(HangingNet(num_classes=2).state_dict(), source / "stuck.pt")
        ensembles = {"rel": ensemble_doc(version, [("a", "SmallNet"), ("b", "SmallNet")])}
        if tag == "v1":
            ensembles["hang"] = ensemble_doc("1.0", [("a", "SmallNet"), ("stuck", "HangingNet")], HANG_TIMEOUT_S)
        (source / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": ensembles}))
        specs[tag] = load_ensembles(source / "ensembles.yaml")
    build_archive(specs["v1"]["rel"], store)
    build_archive(specs["v1"]["hang"], store)
    for tag, file_name in (("v2", "rel-broken.mar"), ("v3", "rel-v3.mar")):
        built = build_archive(specs[tag]["rel"], folder / f"store-{tag}")
        shutil.move(built, store / file_name)
    corrupt_member(store / "rel-broken.mar", "members/a.safetensors")
    cpu = torch.device("cpu")
    return Workspace(store, Ensemble.from_spec(specs["v1"]["rel"], cpu), Ensemble.from_spec(specs["v3"]["rel"], cpu))


def corrupt_member(archive: Path, member_file: str) -> None:
    """Change one byte of a member's weights inside a built archive, leaving its manifest as it was."""
    rewritten = archive.with_suffix(".tmp")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == member_file:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            target.writestr(item, data)
    rewritten.replace(archive)


@contextmanager
def running(workdir: Path, store: Path, port_offset: int, overrides: dict[str, str] | None = None) -> Iterator[Server]:
    server = private_server(workdir, store, port_offset=port_offset, overrides=overrides)
    try:
        start(server, store)
        yield server
    finally:
        stop(server)


def manage(server: Server, method: str, path: str, **params: Any) -> requests.Response:
    return requests.request(
        method, f"{server.management}{path}", params=params, headers=server.headers("management"), timeout=120
    )


def register(server: Server, archive: str) -> requests.Response:
    return manage(server, "POST", "/models", url=archive, initial_workers=1, synchronous="true")


def worker_pid(server: Server, name: str) -> int:
    [worker] = manage(server, "GET", f"/models/{name}").json()[0]["workers"]
    return int(worker["pid"])


def predictions_url(server: Server, name: str) -> str:
    return f"{server.inference}/predictions/{name}"


def png_post(server: Server, data: bytes) -> dict[str, Any]:
    return {"data": data, "headers": {**server.headers("inference"), "Content-Type": "image/png"}}


def expected_predictions(reference: Ensemble, images: list[bytes]) -> list[dict[str, Any]]:
    probs = reference.probabilities([decode_image(data, reference.spec.limits) for data in images])
    return reference.render(probs, reference.spec.policy)["predictions"]


def same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Labels equal and scores within 1e-5, for the ensemble and every member."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        pairs = [(g, w)] + [(g["members"].get(m, {}), w["members"][m]) for m in w["members"]]
        for a, b in pairs:
            if a.get("label") != b["label"] or a.get("score") is None or abs(a["score"] - b["score"]) > 1e-5:
                return False
    return True


def bad_inputs(server: Server, ledger: Ledger, reference: Ensemble) -> list[dict[str, Any]]:
    """Each case sent at once with as many good requests, so they share batches; each answered as catalogued."""
    cases = catalogue(MAX_IMAGES)
    goods = [encoded(photo(1000 + i, (32, 32))) for i in range(len(cases))]
    pid = worker_pid(server, "rel")

    def send_case(case: BadInput) -> requests.Response | None:
        url = predictions_url(server, "rel") if case.path == "predictions" else f"{server.inference}/models/rel/invoke"
        request = dict(case.request)
        request["headers"] = {**server.headers("inference"), **request.get("headers", {})}
        return ledger.post(url, **request)

    with ThreadPoolExecutor(2 * len(cases)) as pool:
        case_answers = [pool.submit(send_case, case) for case in cases]
        good_answers = [
            pool.submit(ledger.post, predictions_url(server, "rel"), **png_post(server, data)) for data in goods
        ]
        case_responses = [future.result() for future in case_answers]
        good_responses = [future.result() for future in good_answers]
    rows = []
    for case, response in zip(cases, case_responses, strict=True):
        rows.append(judge(case, response, reference))
    good_ok = sum(
        r is not None
        and r.status_code == 200
        and same_predictions(r.json()["predictions"], expected_predictions(reference, [data]))
        for r, data in zip(good_responses, goods, strict=True)
    )
    rows.append(
        {
            "case": f"{len(goods)} good requests in the same batches",
            "expected": "200",
            "got": f"{good_ok} x 200",
            "ok": good_ok == len(goods),
            "statuses": [None if r is None else r.status_code for r in good_responses],
        }
    )
    after = worker_pid(server, "rel")
    rows.append(
        {
            "case": "worker kept serving",
            "expected": str(pid),
            "got": str(after),
            "ok": after == pid,
            "pid_before": pid,
            "pid_after": after,
        }
    )
    return rows


def judge(case: BadInput, response: requests.Response | None, reference: Ensemble) -> dict[str, Any]:
    """Whether one case got its status, a JSON {code, type, message} error, or predictions equal to its twin's."""
    row = {
        "case": case.name,
        "expected": f"{case.status} {case.type or ''}".strip(),
        "got": "no answer",
        "ok": False,
        "status": None,
        "type": None,
    }
    if response is None:
        return row
    row["status"] = response.status_code
    if not case.json_error:
        row.update(
            got=f"{response.status_code} (TorchServe's frontend: {response.text.strip()[:60] or 'empty body'})",
            ok=response.status_code == case.status,
        )
        return row
    try:
        body = response.json()
    except ValueError:
        row["got"] = f"{response.status_code} (not JSON)"
        return row
    if case.status == 200:
        matches = response.status_code == 200 and same_predictions(
            body["predictions"], expected_predictions(reference, list(case.same_as))
        )
        row.update(got=f"{response.status_code}" + ("" if matches else " (other predictions)"), ok=matches)
        return row
    error_type = body.get("type") if isinstance(body, dict) else None
    has_fields = isinstance(body, dict) and {"code", "type", "message"} <= set(body) and bool(body["message"])
    row["got"] = f"{response.status_code} {error_type}: {body.get('message', '') if isinstance(body, dict) else ''}"[
        :160
    ]
    row["type"] = error_type
    row["ok"] = response.status_code == case.status and has_fields and (case.type is None or error_type == case.type)
    return row


def cross_talk(
    server: Server, ledger: Ledger, reference: Ensemble, *, inputs: int = 1000, clients: int = 64
) -> dict[str, Any]:
    """`inputs` distinct images in requests of 1-3, from `clients` threads: every answer must be its own."""
    images = [encoded(photo(5000 + i, (32, 32))) for i in range(inputs)]
    requests_of, cursor = [], 0
    while cursor < inputs:
        size = 1 + cursor % 3
        requests_of.append(list(range(cursor, min(inputs, cursor + size))))
        cursor += size
    expected = expected_predictions(reference, images)

    def send(indices: list[int]) -> bool:
        files = [(f"p{i}", (f"{i}.png", images[i], "image/png")) for i in indices]
        response = ledger.post(predictions_url(server, "rel"), files=files, headers=server.headers("inference"))
        return (
            response is not None
            and response.status_code == 200
            and same_predictions(response.json()["predictions"], [expected[i] for i in indices])
        )

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(send, requests_of))
    return {
        "inputs": inputs,
        "requests": len(requests_of),
        "clients": clients,
        "matched": sum(outcomes),
        "seconds": round(time.monotonic() - began, 1),
    }


@contextmanager
def traffic(
    send: Callable[[], requests.Response | None], clients: int
) -> Iterator[list[tuple[float, float, int | None, Any]]]:
    """Clients sending back to back until the block ends; yields (start, end, status, body) per request."""
    log: list[tuple[float, float, int | None, Any]] = []
    stop_event = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + 900
        while not stop_event.is_set() and time.monotonic() < deadline:
            begin = time.monotonic()
            response = send()
            body = None
            if response is not None and response.status_code == 200:
                body = response.json()
            log.append((begin, time.monotonic(), None if response is None else response.status_code, body))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield log
    finally:
        stop_event.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)


def wait_for_success(log: list[tuple[float, float, int | None, Any]], after: float, limit_s: float) -> float | None:
    """Seconds from `after` to the end of the first 200 of a request sent after it, waiting at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        done = [end for begin, end, status, _ in list(log) if begin > after and status == 200]
        if done:
            return min(done) - after
        time.sleep(0.05)
    return None


def kill_worker(server: Server, ledger: Ledger) -> dict[str, Any]:
    """SIGKILL the worker under load: only requests in flight fail, with a 5xx; TorchServe restarts it.

    Each client has one request in flight at a time, so "only the requests in flight" means at most one
    failure per client, all ending right at the kill.
    """
    image = encoded(photo(7, (32, 32)))
    pid = worker_pid(server, "rel")
    with traffic(
        lambda: ledger.post(predictions_url(server, "rel"), expect_5xx=True, **png_post(server, image)),
        clients=KILL_CLIENTS,
    ) as log:
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovery = wait_for_success(log, killed_at, 90)
        time.sleep(1.0)
        settled_at = time.monotonic()
        time.sleep(1.0)
    failed = [(begin, end, status) for begin, end, status, _ in log if status != 200]
    later = [status for begin, _, status, _ in log if begin > settled_at]
    new_pid = worker_pid(server, "rel")
    return {
        "fault": "worker SIGKILL under load",
        "clients": KILL_CLIENTS,
        "failed": len(failed),
        "failed_statuses": sorted({str(status) for _, _, status in failed}),
        "failed_ended_s_after_kill": sorted(round(end - killed_at, 2) for _, end, _ in failed),
        "failed_within_1s_of_kill": all(abs(end - killed_at) <= 1.0 for _, end, _ in failed),
        "later_requests": len(later),
        "later_statuses": sorted({str(status) for status in later}),
        "later_all_ok": bool(later) and all(status == 200 for status in later),
        "recovery_s": None if recovery is None else round(recovery, 2),
        "pid_before": pid,
        "pid_after": new_pid,
        "new_pid": new_pid != pid,
    }


def hanging_member(server: Server, ledger: Ledger) -> dict[str, Any]:
    """A member stuck past the response timeout: that request fails near the timeout, then the worker is replaced."""
    white = encoded(photo(0, (32, 32)).point(lambda _: 255))
    normal = encoded(photo(9, (32, 32)))
    pid = worker_pid(server, "hang")
    began = time.monotonic()
    stuck = ledger.post(predictions_url(server, "hang"), expect_5xx=True, **png_post(server, white))
    failed_after = time.monotonic() - began
    recovered_at = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        response = ledger.post(predictions_url(server, "hang"), expect_5xx=True, **png_post(server, normal))
        if response is not None and response.status_code == 200:
            recovered_at = time.monotonic()
            break
        time.sleep(0.2)
    later = [ledger.post(predictions_url(server, "hang"), **png_post(server, normal)) for _ in range(5)]
    new_pid = worker_pid(server, "hang")
    return {
        "fault": f"member hangs past the {HANG_TIMEOUT_S} s response timeout",
        "status": None if stuck is None else stuck.status_code,
        "failed_after_s": round(failed_after, 2),
        "recovery_s": None if recovered_at is None else round(recovered_at - began - failed_after, 2),
        "later_statuses": [None if r is None else r.status_code for r in later],
        "later_all_ok": all(r is not None and r.status_code == 200 for r in later),
        "pid_before": pid,
        "pid_after": new_pid,
        "worker_replaced": new_pid != pid,
    }


def corrupted_archive(server: Server, ledger: Ledger, workdir: Path) -> dict[str, Any]:
    """Register rel 2.0 whose member 'a' changed after the build: refused, named in the log; rel 1.0 keeps serving."""
    response = register(server, "rel-broken.mar")
    versions = [entry["modelVersion"] for entry in manage(server, "GET", "/models/rel/all").json()]
    if "2.0" in versions:
        manage(server, "DELETE", "/models/rel/2.0")
    log_text = "\n".join(path.read_text(errors="replace") for path in (workdir / "logs").glob("model_log*.log"))
    named = "member 'a': members/a.safetensors: sha256 mismatch" in log_text
    still = ledger.post(predictions_url(server, "rel"), **png_post(server, encoded(photo(11, (32, 32)))))
    return {
        "fault": "corrupted .mar registered as a new version",
        "register_status": response.status_code,
        "register_message": response.text.strip()[:200],
        "log_names_member_and_digest": named,
        "versions_after": [v for v in versions if v != "2.0"],
        "served_status": None if still is None else still.status_code,
        "served_version": still.json()["version"] if still is not None and still.status_code == 200 else None,
        "previous_version_serves": still is not None and still.status_code == 200 and still.json()["version"] == "1.0",
    }


def version_switch(server: Server, ledger: Ledger) -> dict[str, Any]:
    """Register rel 3.0 and make it the default while 4 clients send: nothing fails, every answer names its version."""
    image = encoded(photo(12, (32, 32)))
    with traffic(lambda: ledger.post(predictions_url(server, "rel"), **png_post(server, image)), clients=4) as log:
        time.sleep(1.0)
        registered = register(server, "rel-v3.mar")
        switched = manage(server, "PUT", "/models/rel/3.0/set-default")
        switched_at = time.monotonic()
        time.sleep(2.0)
    versions = [(begin, body["version"] if body else None) for begin, _, _, body in log]
    return {
        "fault": "new version registered and made default under traffic",
        "register_status": registered.status_code,
        "set_default_status": switched.status_code,
        "requests": len(log),
        "failed": sum(status != 200 for _, _, status, _ in log),
        "answered_by": sorted({v for _, v in versions if v}),
        "answered_by_after_switch": sorted({str(v) for begin, v in versions if begin > switched_at + 0.5}),
        "after_switch_all_new": all(v == "3.0" for begin, v in versions if begin > switched_at + 0.5),
    }


def soak(server: Server, ledger: Ledger, mode: Mode) -> dict[str, Any]:
    """Saturation for mode.soak_s: non-2xx count, p99 per fifth of the run, worker RSS growth after the warm-up."""
    image = encoded(photo(13, (32, 32)))
    process = psutil.Process(worker_pid(server, "rel"))
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    with traffic(lambda: ledger.post(predictions_url(server, "rel"), **png_post(server, image)), clients=8) as log:
        while time.monotonic() - began < mode.soak_s:
            samples.append((time.monotonic() - began, process.memory_info().rss / 2**20))
            time.sleep(min(2.0, mode.soak_s / 20))
    windows = []
    for k in range(5):
        low, high = began + k * mode.soak_s / 5, began + (k + 1) * mode.soak_s / 5
        windows.append(p50_p99_ms([end - begin for begin, end, _, _ in log if low <= begin < high])[1])
    after_warmup = [rss for t, rss in samples if t >= mode.soak_warmup_s]
    baseline = after_warmup[0] if after_warmup else samples[-1][1]
    return {
        "seconds": mode.soak_s,
        "requests": len(log),
        "non_2xx": sum(status != 200 for _, _, status, _ in log),
        "p99_ms_by_fifth": [round(v, 1) for v in windows],
        "rss_start_mb": round(samples[0][1], 1),
        "rss_after_warmup_mb": round(baseline, 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_growth_mb": round(max(after_warmup or [baseline]) - baseline, 1),
    }


def overload(server: Server, ledger: Ledger, mode: Mode) -> dict[str, Any]:
    """Far more requests than the edge queue holds: only 200 or 503, none past the client timeout; then all succeed."""
    images = [encoded(photo(20 + i, (32, 32))) for i in range(MAX_IMAGES)]
    files = [(f"p{i}", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]

    def send() -> requests.Response | None:
        return ledger.post(
            predictions_url(server, "rel"), expect_5xx=True, files=files, headers=server.headers("inference")
        )

    with traffic(send, clients=32) as log:
        time.sleep(mode.overload_s)
    dropped_at = time.monotonic()
    after = [ledger.post(predictions_url(server, "rel"), **png_post(server, images[0])) for _ in range(10)]
    recovered_s = time.monotonic() - dropped_at
    statuses: dict[str, int] = {}
    for _, _, status, _ in log:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "clients": 32,
        "queue": EDGE_QUEUE,
        "requests": len(log),
        "statuses": statuses,
        "only_200_or_503": set(statuses) <= {"200", "503"},
        "slowest_s": round(max((end - begin for begin, end, _, _ in log), default=0.0), 2),
        "after_load_statuses": [None if r is None else r.status_code for r in after],
        "after_load_all_ok": all(r is not None and r.status_code == 200 for r in after),
        "after_load_s": round(recovered_s, 2),
    }


def token_expiry(server: Server, ledger: Ledger, started_at: float) -> dict[str, Any]:
    """Keys of the edge server expire after 1 minute: refused with 400; after a refresh, accepted."""
    time.sleep(max(0.0, started_at + 62 - time.monotonic()))
    image = encoded(photo(14, (32, 32)))
    expired = ledger.post(predictions_url(server, "rel"), **png_post(server, image))
    missing = ledger.post(predictions_url(server, "rel"), data=image, headers={"Content-Type": "image/png"})
    refreshed = requests.post(
        f"{server.management}/token",
        params={"type": "inference"},
        headers=server.headers("API"),
        timeout=CLIENT_TIMEOUT_S,
    )
    accepted = ledger.post(predictions_url(server, "rel"), **png_post(server, image))
    return {
        "fault": "expired and missing token, then refreshed",
        "expired_status": None if expired is None else expired.status_code,
        "missing_status": None if missing is None else missing.status_code,
        "refresh_status": refreshed.status_code,
        "after_refresh_status": None if accepted is None else accepted.status_code,
    }


def run_suite(mode: Mode, workdir: Path) -> dict[str, Any]:
    """Every section in order; returns the report."""
    ledger = Ledger()
    began = time.monotonic()
    workspace = build_workspace(workdir / "src")
    report: dict[str, Any] = {"mode": mode.name}
    edge_overrides = {"job_queue_size": str(EDGE_QUEUE), "token_expiration_min": "1"}
    with running(workdir / "edge", workspace.store, 20200, edge_overrides) as edge:
        edge_started = time.monotonic()
        register(edge, "rel.mar").raise_for_status()
        report["overload"] = overload(edge, ledger, mode)
        with running(workdir / "main", workspace.store, 20100) as main:
            for archive in ("rel.mar", "hang.mar"):
                register(main, archive).raise_for_status()
            report["bad_inputs"] = bad_inputs(main, ledger, workspace.reference)
            report["cross_talk"] = cross_talk(main, ledger, workspace.reference)
            report["faults"] = [
                kill_worker(main, ledger),
                hanging_member(main, ledger),
                corrupted_archive(main, ledger, workdir / "main"),
                version_switch(main, ledger),
            ]
            report["soak"] = soak(main, ledger, mode)
        report["faults"].append(token_expiry(edge, ledger, edge_started))
    recoveries = [f["recovery_s"] for f in report["faults"] if f.get("recovery_s") is not None]
    report["summary"] = {
        "bad_inputs_tried": len(report["bad_inputs"]) - 2,
        "bad_inputs_mishandled": sum(not row["ok"] for row in report["bad_inputs"]),
        "faults_injected": len(report["faults"]),
        "requests_sent": ledger.sent,
        "requests_answered": sum(ledger.statuses.values()),
        "requests_lost": ledger.lost,
        "unexpected_5xx": ledger.unexpected_5xx,
        "max_recovery_s": max(recoveries) if recoveries else None,
        "rss_growth_mb": report["soak"]["rss_growth_mb"],
        "statuses": dict(sorted(ledger.statuses.items())),
        "seconds": round(time.monotonic() - began, 1),
    }
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| bad input | expected | got | ok |", "|---|---|---|---|"]
    lines += [
        f"| {r['case']} | {r['expected']} | {r['got']} | {'yes' if r['ok'] else '**NO**'} |"
        for r in report["bad_inputs"]
    ]
    lines += ["", "| fault | outcome |", "|---|---|"]
    for fault in report["faults"]:
        details = ", ".join(f"{k}={v}" for k, v in fault.items() if k != "fault")
        lines.append(f"| {fault['fault']} | {details} |")
    lines += ["", "| load | outcome |", "|---|---|"]
    for section in ("cross_talk", "overload", "soak"):
        lines.append(f"| {section} | {', '.join(f'{k}={v}' for k, v in report[section].items())} |")
    lines += ["", "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["summary"].items()]
    return "\n".join(lines)


def measure(mode: Mode = QUICK) -> dict[str, Any]:
    """Run every section in a temporary folder; return the report (what `tests/test_reliability.py` asserts on)."""
    with tempfile.TemporaryDirectory(prefix="reliability-") as folder:
        report = run_suite(mode, Path(folder))
    report["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the suite, print the table, write the JSON; exit 1 if any input was mishandled or any request lost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="soak for 10 minutes instead of 20 seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = measure(FULL if args.full else QUICK)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report["summary"], "report": report}, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    summary = report["summary"]
    if summary["bad_inputs_mishandled"] or summary["requests_lost"] or summary["unexpected_5xx"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
