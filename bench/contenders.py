"""The ways of serving an ensemble that the benchmark compares, each on the same images and cores.

(A) in-process ceiling: decode, transform once, run the members; no HTTP.
(B) ours: the ensemble .mar on TorchServe.
(C) FlexServe-style Flask app on gunicorn, all members in one process.
(D) TorchServe fan-out: one .mar per member; the client calls all of them and combines.
(E) Triton Inference Server via PyTriton, dynamic batching, all members in one Python model (bench/triton_server.py).
(F) Ray Serve, `@serve.batch`, all members in one deployment (bench/ray_server.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from bench.loadgen import Labels, LoadPoint, Send, p50_p99_ms
from bench.workloads import Workload
from handlers.config.specs import EnsembleSpec
from handlers.errors import MemberLoadError

TIMEOUT_S = 60
FLASK_PORT = 38190  # not 38180: the private TorchServes of the other contenders listen there (8080 + 30100)
TRITON_PORT = 38200  # HTTP; gRPC on 38201, metrics on 38202 (bench/triton_server.py)
RAY_PORT = 38300
ROOT = Path(__file__).parent.parent
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"


def members_view(body: dict[str, Any]) -> Labels:
    """Per image, each member's label, from our response's FlexServe-style `members` view."""
    view: dict[str, list[str]] = body["members"]
    count = len(next(iter(view.values())))
    return [{member: labels[i] for member, labels in view.items()} for i in range(count)]


def post_images(session: requests.Session, url: str, images: list[bytes], headers: dict[str, str]) -> dict[str, Any]:
    if len(images) == 1:
        response = session.post(url, data=images[0], headers={**headers, "Content-Type": "application/octet-stream"}, timeout=TIMEOUT_S)
    else:
        files = [(f"image{i}", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
        response = session.post(url, files=files, headers=headers, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def ceiling(
    workload: Workload, batch: int, processes: int, threads: int, total_images: int, *, plan: str = "eager", archive: Path | None = None
) -> LoadPoint:
    """Images/s of decode + transform + all members in `processes` processes, no HTTP; latency per batch.

    `plan` is every member's execution plan: `eager` for (A). With `archive` (an extracted .mar), (A') loads it
    as a worker does: members side by side on `threads` threads of one intra-op thread, each on the plan `auto`
    finds fastest among every plan and engine the archive holds.
    """
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes)
    results = context.Queue()
    indices = [i % len(workload.images) for i in range(total_images)]
    shares = [indices[p::processes] for p in range(processes)]
    workers = [
        context.Process(target=_ceiling_worker, args=(workload, share, batch, threads, plan, archive, ready, results))
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


def _ceiling_worker(
    workload: Workload, share: list[int], batch: int, threads: int, plan: str, archive: Path | None, ready: Any, results: Any
) -> None:
    from handlers.ensemble import Ensemble
    from handlers.inputs.images import decode_image

    if archive is None:
        torch.set_num_threads(threads)
        ensemble = Ensemble.from_spec(workload.spec.with_plan(plan), torch.device("cpu"))
    else:
        torch.set_num_threads(1)
        ensemble = Ensemble.from_model_dir(archive, torch.device("cpu"), parallelism=threads)
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
def extracted_archive(workload: Workload) -> Iterator[Path]:
    """The workload's ensemble built into a .mar (ONNX exports included) and extracted as TorchServe would."""
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as folder:
        archive = build_archive(workload.spec, Path(folder) / "store")
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(Path(folder) / "model")
        yield Path(folder) / "model"


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
def serving(specs: list[EnsembleSpec], refused: dict[str, str] | None = None) -> Iterator[Server]:
    """A private TorchServe on 127.0.0.1 with each ensemble built and registered with its own workers.

    Given `refused`, an ensemble whose build a member refuses (a plan it cannot run) is left out and the reason
    recorded there under its name; otherwise the build's MemberLoadError propagates.
    """
    with tempfile.TemporaryDirectory(prefix="bench-ts-") as folder:
        store, built = Path(folder) / "model_store", []
        for spec in specs:
            try:
                build_archive(spec, store)
            except MemberLoadError as e:
                if refused is None:
                    raise
                refused[spec.name] = str(e)
                continue
            built.append(spec)
        server = private_server(Path(folder) / "server", store, port_offset=30100)
        try:
            start(server, store)
            for spec in built:
                register(server, spec.name, spec.batching.workers)
            yield server
        finally:
            stop(server)


def ensemble_sender(server: Server, name: str, images: tuple[bytes, ...]) -> Send:
    url = f"{server.inference}/predictions/{name}"
    headers = server.headers("inference")
    return lambda indices: members_view(post_images(thread_session(), url, [images[i] for i in indices], headers))


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
    return post_images(thread_session(), url, images, headers)


_local = threading.local()


def thread_session() -> requests.Session:
    """One keep-alive session per client thread (requests sessions are not thread-safe)."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


@contextmanager
def flask_gunicorn(workload: Workload, config: Path, *, workers: int = 2) -> Iterator[Send]:
    """The FlexServe-style baseline on gunicorn, `workers` processes of 1 torch thread each."""
    with gunicorn(config, workload.spec.name, workers=workers) as url:
        yield lambda indices: members_view(post_images(thread_session(), url, [workload.images[i] for i in indices], {}))


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


@contextmanager
def triton(
    workload: Workload,
    *,
    instances: int = 1,
    member_threads: int = 2,
    threads: int = 1,
    max_batch_size: int = 64,
    queue_delay_us: int = 0,
    model_dir: Path,
    plan: str = "eager",
) -> Iterator[Send]:
    """(E) Triton with dynamic batching through PyTriton (bench/triton_server.py, in .venv-triton).

    One request of N images is one KServe v2 inference request of N rows of the BYTES input `image`
    (binary tensor extension); each row of the output `result` is that image's rendered prediction.
    The defaults are the configuration bench/triton_server.py's docstring explains. `model_dir` is the ensemble's
    archive, extracted; `plan` is every member's: eager for (E), `onnxruntime` for `triton_onnxruntime`.
    """
    if not TRITON_PYTHON.exists():
        raise RuntimeError(f"{TRITON_PYTHON} is missing: `make bench` builds .venv-triton from bench/requirements-triton.txt")
    settings = {
        "BENCH_TRITON_INSTANCES": instances,
        "BENCH_TRITON_MEMBER_THREADS": member_threads,
        "BENCH_THREADS": threads,
        "BENCH_TRITON_MAX_BATCH": max_batch_size,
        "BENCH_TRITON_DELAY_US": queue_delay_us,
    }
    env = {**os.environ, "BENCH_TRITON_MODEL_DIR": str(model_dir), "BENCH_TRITON_PLAN": plan}
    env.update({key: str(value) for key, value in settings.items()})
    command = [str(TRITON_PYTHON), "-m", "bench.triton_server"]
    base = f"http://127.0.0.1:{TRITON_PORT}/v2/models/ensemble"
    # Triton.serve() shuts the server and its Python stubs down on SIGINT.
    ports = (TRITON_PORT, TRITON_PORT + 1, TRITON_PORT + 2)
    with _server(command, env, f"{base}/ready", "triton", ports=ports, stop_signal=signal.SIGINT):
        yield lambda indices: _triton_infer(thread_session(), f"{base}/infer", [workload.images[i] for i in indices])


def _triton_infer(session: requests.Session, url: str, images: list[bytes]) -> Labels:
    """One v2 inference request: a JSON header, then the BYTES tensor (4-byte little-endian length + data per row)."""
    tensor = b"".join(struct.pack("<I", len(data)) + data for data in images)
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [len(images), 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(tensor)}}
            ],
            "outputs": [{"name": "result", "parameters": {"binary_data": False}}],
        }
    ).encode()
    response = session.post(
        url,
        data=header + tensor,
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        timeout=TIMEOUT_S,
    )
    response.raise_for_status()
    (output,) = response.json()["outputs"]
    return [_entry_labels(json.loads(row)) for row in output["data"]]


def _entry_labels(entry: dict[str, Any]) -> dict[str, str]:
    """Each member's label from one image's entry of a rendered body's `predictions`."""
    return {name: view["labels"] if "labels" in view else view["label"] for name, view in entry["members"].items()}


@contextmanager
def ray_serve(
    workload: Workload,
    *,
    replicas: int = 1,
    member_threads: int = 2,
    threads: int = 1,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
) -> Iterator[Send]:
    """(F) Ray Serve with `@serve.batch` (bench/ray_server.py): a private local Ray, dashboard off, HTTP on 127.0.0.1.

    It takes the Flask baseline's bodies (raw for one image, multipart for several) and answers with
    the rendered body. The defaults are the configuration bench/ray_server.py's docstring explains.
    """
    settings = {
        "BENCH_RAY_REPLICAS": replicas,
        "BENCH_RAY_MEMBER_THREADS": member_threads,
        "BENCH_THREADS": threads,
        "BENCH_RAY_MAX_BATCH": max_batch_size,
        "BENCH_RAY_WAIT_S": batch_wait_timeout_s,
    }
    env = {
        **os.environ,
        "BENCH_ENSEMBLES": str(workload.config),
        "BENCH_ENSEMBLE": workload.spec.name,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT.resolve()), os.environ.get("PYTHONPATH")])),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.update({key: str(value) for key, value in settings.items()})
    command = [sys.executable, "-m", "bench.ray_server"]
    url = f"http://127.0.0.1:{RAY_PORT}"
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:  # Short: Ray's socket paths live under it.
        env["BENCH_RAY_TMP"] = folder
        with _server(command, env, f"{url}/health", "ray serve", ports=(RAY_PORT,), stop_signal=signal.SIGTERM):
            yield lambda indices: members_view(post_images(thread_session(), f"{url}/predict", [workload.images[i] for i in indices], {}))


@contextmanager
def _server(
    command: list[str], env: dict[str, str], ready_url: str, name: str, *, ports: tuple[int, ...], stop_signal: int
) -> Iterator[None]:
    """Check that `ports` are free, run `command` in its own session until `ready_url` answers; on exit stop it,
    then kill whatever it left.

    The server's descendants (Triton and its stubs; Ray's GCS, raylet, workers) are collected just
    before stopping it, and any still alive 30 s after the stop signal are killed.
    """
    for port in ports:
        _check_free(port, name)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_ready(ready_url, process, name, log)
            yield
        finally:
            try:
                family = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            _, alive = psutil.wait_procs(family, timeout=10)
            for leftover in alive:
                leftover.kill()
            psutil.wait_procs(alive, timeout=10)


def _check_free(port: int, name: str) -> None:
    """Fail at once when a port is taken (Triton itself would wait 120 s for its own server, then give up)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As the servers do: TIME_WAIT is no conflict.
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise RuntimeError(f"{name}: port {port} on 127.0.0.1 is in use (a server left from an earlier run?)") from error


def _wait_ready(url: str, process: subprocess.Popen[bytes], name: str, log: Any, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{tail}")
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:  # Not listening yet, or the model not loaded yet.
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name}: {url} did not answer within {limit_s:.0f} s")
