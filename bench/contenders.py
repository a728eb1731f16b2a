"""The ways of serving an ensemble that the benchmark compares, each on the same images and cores.

(A) in-process ceiling: decode, transform once, run the members; no HTTP.
(B) ours: the ensemble .mar on TorchServe.
(C) FlexServe-style Flask app on gunicorn, all members in one process.
(D) TorchServe fan-out: one .mar per member; the client calls all of them and combines.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from bench.loadgen import Labels, LoadPoint, Send, p50_p99_ms
from bench.workloads import Workload
from handlers.manifest import EnsembleSpec

TIMEOUT_S = 60
FLASK_PORT = 38180


def members_view(body: dict[str, Any]) -> Labels:
    """Per image, each member's label, from our response's FlexServe-style `members` view."""
    view: dict[str, list[str]] = body["members"]
    count = len(next(iter(view.values())))
    return [{member: labels[i] for member, labels in view.items()} for i in range(count)]


def _post(session: requests.Session, url: str, images: list[bytes], headers: dict[str, str]) -> dict[str, Any]:
    if len(images) == 1:
        response = session.post(url, data=images[0], headers={**headers, "Content-Type": "application/octet-stream"}, timeout=TIMEOUT_S)
    else:
        files = [(f"image{i}", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
        response = session.post(url, files=files, headers=headers, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def ceiling(workload: Workload, batch: int, processes: int, threads: int, total_images: int) -> LoadPoint:
    """Images/s of decode + transform + all members in `processes` processes, no HTTP; latency per batch."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes)
    results = context.Queue()
    indices = [i % len(workload.images) for i in range(total_images)]
    shares = [indices[p::processes] for p in range(processes)]
    workers = [
        context.Process(target=_ceiling_worker, args=(workload, share, batch, threads, ready, results))
        for share in shares
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    begin = min(o["begin"] for o in outcomes)
    end = max(o["end"] for o in outcomes)
    latencies = [latency for o in outcomes for latency in o["latencies"]]
    p50, p99 = p50_p99_ms(latencies)
    return LoadPoint(
        images_per_s=total_images / (end - begin),
        requests_per_s=len(latencies) / (end - begin),
        p50_ms=p50,
        p99_ms=p99,
        errors=0,
        mismatches=sum(o["mismatches"] for o in outcomes),
        requests=len(latencies),
    )


def _ceiling_worker(workload: Workload, share: list[int], batch: int, threads: int, ready: Any, results: Any) -> None:
    from handlers.ensemble import Ensemble
    from handlers.preprocess import decode_image

    torch.set_num_threads(threads)
    ensemble = Ensemble.from_spec(workload.spec, torch.device("cpu"))
    ensemble.probabilities([decode_image(workload.images[share[0]], workload.spec.limits)])
    ready.wait()
    begin = time.time()
    latencies, mismatches = [], 0
    for start_at in range(0, len(share), batch):
        chunk = share[start_at : start_at + batch]
        tick = time.perf_counter()
        probs = ensemble.probabilities([decode_image(workload.images[i], workload.spec.limits) for i in chunk])
        labels = members_view(ensemble.render(probs, ensemble.spec.policy))
        latencies.append(time.perf_counter() - tick)
        mismatches += sum(got != workload.expected[i] for got, i in zip(labels, chunk, strict=True))
    results.put({"begin": begin, "end": time.time(), "latencies": latencies, "mismatches": mismatches})


@contextmanager
def torchserve(workload: Workload, *, fan_out: bool) -> Iterator[Send]:
    """Ours (one ensemble .mar) or fan-out (one .mar per member) on a private TorchServe."""
    specs = workload.member_specs() if fan_out else [workload.spec]
    with serving(specs) as server, ThreadPoolExecutor(max_workers=64, thread_name_prefix="fan-out") as pool:
        if fan_out:
            yield _fan_out_sender(server, [spec.name for spec in specs], workload.images, pool)
        else:
            yield ensemble_sender(server, workload.spec.name, workload.images)


@contextmanager
def serving(specs: list[EnsembleSpec]) -> Iterator[Server]:
    """A private TorchServe on 127.0.0.1 with each ensemble built and registered with its own workers."""
    with tempfile.TemporaryDirectory(prefix="bench-ts-") as folder:
        store = Path(folder) / "model_store"
        for spec in specs:
            build_archive(spec, store)
        server = private_server(Path(folder) / "server", store, port_offset=30100)
        try:
            start(server, store)
            for spec in specs:
                register(server, spec.name, spec.batching.workers)
            yield server
        finally:
            stop(server)


def ensemble_sender(server: Server, name: str, images: tuple[bytes, ...]) -> Send:
    url = f"{server.inference}/predictions/{name}"
    headers = server.headers("inference")
    return lambda indices: members_view(_post(_session(), url, [images[i] for i in indices], headers))


def _fan_out_sender(server: Server, names: list[str], images: tuple[bytes, ...], pool: ThreadPoolExecutor) -> Send:
    """Every request goes to every member's .mar at once (on `pool`); their answers are merged per image."""
    headers = server.headers("inference")

    def send(indices: list[int]) -> Labels:
        chosen = [images[i] for i in indices]
        futures = [pool.submit(_post_fresh, f"{server.inference}/predictions/{n}", chosen, headers) for n in names]
        merged: Labels = [{} for _ in indices]
        for future in futures:
            for combined, own in zip(merged, members_view(future.result()), strict=True):
                combined.update(own)
        return merged

    return send


def _post_fresh(url: str, images: list[bytes], headers: dict[str, str]) -> dict[str, Any]:
    return _post(_session(), url, images, headers)


_local = threading.local()


def _session() -> requests.Session:
    """One keep-alive session per client thread (requests sessions are not thread-safe)."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


@contextmanager
def flask_gunicorn(workload: Workload, config: Path, *, workers: int = 2) -> Iterator[Send]:
    """The FlexServe-style baseline on gunicorn, `workers` processes of 1 torch thread each."""
    with gunicorn(config, workload.spec.name, workers=workers) as url:
        yield lambda indices: members_view(_post(_session(), url, [workload.images[i] for i in indices], {}))


@contextmanager
def gunicorn(config: Path, name: str, *, workers: int = 2) -> Iterator[str]:
    """bench/flask_server.py serving ensemble `name` of `config`; yields its /predict URL."""
    env = {**os.environ, "BENCH_ENSEMBLES": str(config), "BENCH_ENSEMBLE": name, "BENCH_THREADS": "1"}
    executable = Path(sys.executable).parent / "gunicorn"
    command = [str(executable), "-w", str(workers), "-b", f"127.0.0.1:{FLASK_PORT}", "--timeout", "120", "bench.flask_server:create_app()"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_for(f"http://127.0.0.1:{FLASK_PORT}/health", process)
            yield f"http://127.0.0.1:{FLASK_PORT}/predict"
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:  # Not listening yet, or its workers still loading.
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within 120 s")
