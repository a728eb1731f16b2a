"""The ways of serving an ensemble that the benchmark compares, each on the same member files, images and cores.

- ours: the ensemble .mar on TorchServe (the ensemble handler);
- fanout: TorchServe with one .mar per member; the client calls all of them and combines the answers;
- flask: a FlexServe-style Flask app on gunicorn, all members in each process, no batching;
- pytriton: Triton's HTTP frontend and dynamic batcher through PyTriton's Python backend (bench/triton_server.py);
- ray: Ray Serve with `@serve.batch`, all members in one deployment (bench/ray_server.py);
- ceiling: the members called in-process on batches, no HTTP, no server (`CeilingPool`).

Every one loads the ensemble's archive with each member on the same plan (bench/archived.py), and takes a `Setup`
of the one search of bench/search.py: parallel units (workers, processes, replicas, instances), max batch, delay.
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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import requests

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from archive_scripts.waiting import wait_for
from bench.archived import PLANS_ENV, every_member, with_member_plans
from bench.loadgen import Labels, LoadPoint, Send, percentiles_ms
from bench.reference import Answer, Expected, Gate, GateJudge
from handlers.config.policy import resolve_policy
from handlers.config.specs import EnsembleSpec
from handlers.errors import MemberLoadError

TIMEOUT_S = 60
FLASK_PORT = 38190  # not 38180: the private TorchServes of the other contenders listen there (8080 + 30100)
TRITON_PORT = 38200  # HTTP; gRPC on 38201, metrics on 38202 (bench/triton_server.py)
RAY_PORT = 38300
ROOT = Path(__file__).parent.parent
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"


CORES = len(os.sched_getaffinity(0))
LARGEST_REQUEST = 16  # images: the largest request of bench/run.py's load points


@dataclass(frozen=True)
class Setup:
    """One configuration of the search, in each server's own terms: `units` parallel serving units (TorchServe
    workers, gunicorn workers, Ray replicas, Triton model instances, ceiling processes), each running the members
    side by side on cores / units threads of one intra-op thread; up to `max_batch` requests merged per batch
    (1: none), waiting up to `delay_ms` for them."""

    units: int
    max_batch: int = 1
    delay_ms: int = 0

    @property
    def member_threads(self) -> int:
        return max(1, CORES // self.units)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        batching = "no batching" if self.max_batch == 1 else f"batch {self.max_batch}, {self.delay_ms} ms"
        return f"{self.units} unit{'s' if self.units > 1 else ''}, {batching}"


def on_setup(spec: EnsembleSpec, setup: Setup, plans: str | Mapping[str, str], name: str) -> EnsembleSpec:
    """`spec` as TorchServe serves it under `setup`: its batching replaced, every member on `plans` (one plan for
    all, `auto` included, or one per member), registered as `name`."""
    planned = spec.with_plan(plans) if isinstance(plans, str) else with_member_plans(spec, plans)
    batching = replace(
        planned.batching, workers=setup.units, batch_size=setup.max_batch, max_batch_delay_ms=setup.delay_ms
    )
    return replace(planned, name=name, batching=batching)


def entry_answer(entry: Mapping[str, Any]) -> Answer:
    """One prediction of our rendered JSON (`predictions[i]`) as the answers gate reads it."""
    members = {name: (view["label"], float(view["score"])) for name, view in entry["members"].items()}
    return Answer(members, entry["label"], float(entry["score"]))


def body_answers(body: Mapping[str, Any]) -> list[Answer]:
    return [entry_answer(entry) for entry in body["predictions"]]


def members_view(body: dict[str, Any]) -> Labels:
    """Per image, each member's label, from our response's FlexServe-style `members` view."""
    view: dict[str, list[str]] = body["members"]
    count = len(next(iter(view.values())))
    return [{member: labels[i] for member, labels in view.items()} for i in range(count)]


def post_images(session: requests.Session, url: str, images: list[bytes], headers: dict[str, str]) -> dict[str, Any]:
    if len(images) == 1:
        response = session.post(
            url, data=images[0], headers={**headers, "Content-Type": "application/octet-stream"}, timeout=TIMEOUT_S
        )
    else:
        files = [(f"image{i}", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
        response = session.post(url, files=files, headers=headers, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


class CeilingPool:
    """The in-process ceiling: `processes` spawned processes, each with the archive's members on `plans` on
    cores / processes member threads, decoding batches of images and calling the members on them back to back.

    Kept alive across rounds (a round is a command on a queue), so it is measured in the same alternating rounds
    as the servers; each process checks every answer with the gate, outside the timed calls.
    """

    def __init__(
        self,
        model_dir: Path,
        plans: Mapping[str, str],
        processes: int,
        images: Sequence[bytes],
        expected: Sequence[Expected],
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.commands = [context.Queue() for _ in range(processes)]
        self.results = context.Queue()
        member_threads = Setup(processes).member_threads
        self.workers = [
            context.Process(
                target=_ceiling_worker,
                args=(model_dir, dict(plans), member_threads, images, expected, share, processes, queue, self.results),
                daemon=True,
            )
            for share, queue in enumerate(self.commands)
        ]
        for worker in self.workers:
            worker.start()
        for _ in self.workers:
            self.results.get(timeout=600)  # Each reports once its members are loaded and warm.

    def run(self, images_per_call: int, seconds: float) -> tuple[LoadPoint, list[str]]:
        """Every process calling the members on `images_per_call` images at a time for `seconds`."""
        for queue in self.commands:
            queue.put((images_per_call, seconds))
        outcomes = [self.results.get(timeout=seconds + 600) for _ in self.workers]
        begin, end = min(o["begin"] for o in outcomes), max(o["end"] for o in outcomes)
        latencies = [latency for o in outcomes for latency in o["latencies"]]
        images = sum(o["images"] for o in outcomes)
        p50, p90, p99 = percentiles_ms(latencies)
        point = LoadPoint(
            images_per_s=images / (end - begin),
            requests_per_s=len(latencies) / (end - begin),
            p50_ms=p50,
            p99_ms=p99,
            errors=sum(o["errors"] for o in outcomes),
            mismatches=sum(o["mismatches"] for o in outcomes),
            requests=len(latencies),
            p90_ms=p90,
            latency_samples=len(latencies),
            wall_s=round(end - begin, 3),
        )
        return point, [problem for o in outcomes for problem in o["problems"]][: GateJudge.KEPT]

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _ceiling_worker(
    model_dir: Path,
    plans: dict[str, str],
    member_threads: int,
    images: Sequence[bytes],
    expected: Sequence[Expected],
    share: int,
    shares: int,
    commands: Any,
    results: Any,
) -> None:
    from bench.archived import archived_ensemble
    from handlers.inputs.images import decode_image

    ensemble = archived_ensemble(model_dir, plans, member_threads)
    spec = ensemble.spec
    ensemble.probabilities([decode_image(images[0], spec.limits)])
    judge = GateJudge(Gate(spec), expected)
    results.put("ready")
    order = list(range(share, len(images), shares)) or [0]
    while (command := commands.get()) is not None:
        per_call, seconds = command
        latencies, answered, done, errors, at = [], [], 0, 0, 0
        begin = time.time()
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            chunk = [order[(at + k) % len(order)] for k in range(per_call)]
            at += per_call
            tick = time.perf_counter()
            try:
                body = ensemble.render(
                    ensemble.probabilities([decode_image(images[i], spec.limits) for i in chunk]), spec.policy
                )
            except Exception:  # Counted, as a server's failed request is.
                errors += 1
                continue
            latencies.append(time.perf_counter() - tick)
            answered.append((chunk, body))
            done += len(chunk)
        end = time.time()
        mismatches = sum(judge(chunk, body_answers(body)) for chunk, body in answered)
        results.put(
            {
                "begin": begin,
                "end": end,
                "latencies": latencies,
                "images": done,
                "errors": errors,
                "mismatches": mismatches,
                "problems": judge.problems[:],
            }
        )


@contextmanager
def extracted_archive(spec: EnsembleSpec) -> Iterator[Path]:
    """`spec` built into a .mar (ONNX exports included) and extracted as TorchServe would."""
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as folder:
        archive = build_archive(spec, Path(folder) / "store")
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(Path(folder) / "model")
        yield Path(folder) / "model"


@contextmanager
def serving(
    specs: list[EnsembleSpec], refused: dict[str, str] | None = None, *, port_offset: int = 30100
) -> Iterator[Server]:
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
        server = private_server(Path(folder) / "server", store, port_offset=port_offset)
        try:
            start(server, store)
            for spec in built:
                register(server, spec.name, spec.batching.workers)
            yield server
        finally:
            stop(server)


SERVED = ("ours", "ours_eager", "fanout", "flask", "pytriton", "ray")
PORT_OFFSETS = {"ours": 30100, "ours_eager": 30300, "fanout": 30500}  # TorchServe's 8080/8081/8082 + offset


@contextmanager
def served(
    contender: str,
    spec: EnsembleSpec,
    model_dir: Path,
    plans: str | Mapping[str, str],
    setup: Setup,
    images: Sequence[bytes],
    gate: Gate,
) -> Iterator[tuple[Send, dict[str, str]]]:
    """One served contender under `setup`, its members on `plans` (a plan for all, or one per member; the peers
    need one per member), until the block ends. Yields a sender of image indices that returns answers, and the
    plan each member serves (ours on `auto`: what its workers chose, from `describe`)."""
    if isinstance(plans, str) and contender not in ("ours", "ours_eager"):
        plans = every_member(spec, plans)
    if contender in ("ours", "ours_eager"):
        with serving([on_setup(spec, setup, plans, spec.name)], port_offset=PORT_OFFSETS[contender]) as server:
            yield answers_sender(server, spec.name, images), served_plans(server, spec.name)
    elif contender == "fanout":
        assert not isinstance(plans, str), "the peers take one plan per member"
        members = {single.members[0].name: on_setup(single, setup, plans, single.name) for single in member_specs(spec)}
        with (
            serving(list(members.values()), port_offset=PORT_OFFSETS[contender]) as server,
            ThreadPoolExecutor(64, thread_name_prefix="fan-out") as pool,
        ):
            yield (
                fan_out_sender(server, {member: s.name for member, s in members.items()}, images, gate, pool),
                dict(plans),
            )
    else:
        assert not isinstance(plans, str), "the peers take one plan per member"
        launch = {"flask": flask, "pytriton": pytriton, "ray": ray}[contender]
        with launch(model_dir, plans, setup, images) as send:
            yield send, dict(plans)


def member_specs(spec: EnsembleSpec) -> list[EnsembleSpec]:
    """One single-member ensemble per member (what TorchServe fan-out serves, one .mar each), scored by `mean`."""
    single = resolve_policy({"policy": "mean"}, default=None, task=spec.task, n_members=1)
    return [
        replace(spec, name=f"{spec.name}-{member.name}", members=(member,), policy=single) for member in spec.members
    ]


def describe(server: Server, name: str) -> dict[str, Any]:
    """Ensemble `name`'s `describe` on `server` (its customized metadata)."""
    response = requests.get(
        f"{server.management}/models/{name}?customized=true", headers=server.headers("management"), timeout=30
    )
    response.raise_for_status()
    metadata = response.json()[0]["customizedMetadata"]
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def served_plans(server: Server, name: str) -> dict[str, str]:
    """The plan each member of ensemble `name` serves on `server`, from `describe`."""
    return {member["name"]: member["execution"]["plan"] for member in describe(server, name)["members"]}


def ensemble_sender(server: Server, name: str, images: tuple[bytes, ...]) -> Send:
    """Each member's label per image, from ensemble `name` on `server`."""
    url = f"{server.inference}/predictions/{name}"
    headers = server.headers("inference")
    return lambda indices: members_view(post_images(thread_session(), url, [images[i] for i in indices], headers))


def answers_sender(server: Server, name: str, images: Sequence[bytes]) -> Send:
    """Each image's answer (members, label, score), from ensemble `name` on `server`."""
    url = f"{server.inference}/predictions/{name}"
    headers = server.headers("inference")
    return lambda indices: body_answers(post_images(thread_session(), url, [images[i] for i in indices], headers))


def fan_out_sender(
    server: Server, names: Mapping[str, str], images: Sequence[bytes], gate: Gate, pool: ThreadPoolExecutor
) -> Send:
    """Every request goes to every member's own .mar at once (`names`: member -> registered name, on `pool`); the
    client combines their probabilities by the ensemble's policy, as a fan-out user's client must (multiclass
    members are asked for every label's probability, with `top_k`)."""
    headers = server.headers("inference") | (
        {"X-Ensemble-Top-K": str(len(gate.spec.labels))} if gate.spec.task == "multiclass" else {}
    )

    def send(indices: list[int]) -> list[Answer]:
        chosen = [images[i] for i in indices]
        futures = {
            member: pool.submit(_post_fresh, f"{server.inference}/predictions/{name}", chosen, headers)
            for member, name in names.items()
        }
        per_member = {member: future.result()["predictions"] for member, future in futures.items()}
        return [
            gate.combine({member: _probabilities(gate, entries[i]) for member, entries in per_member.items()})
            for i in range(len(indices))
        ]

    return send


def _probabilities(gate: Gate, entry: Mapping[str, Any]) -> tuple[float, ...]:
    """A one-member answer's probabilities: the full ranking (multiclass), or the binary label's score."""
    labels = gate.spec.labels
    if gate.spec.task == "multiclass":
        by_label = {item["label"]: float(item["score"]) for item in entry["top"]}
        return tuple(by_label[label] for label in labels)
    chosen = labels.index(entry["label"])
    return tuple(float(entry["score"]) if j == chosen else 1.0 - float(entry["score"]) for j in range(len(labels)))


def _post_fresh(url: str, images: list[bytes], headers: dict[str, str]) -> dict[str, Any]:
    return post_images(thread_session(), url, images, headers)


_local = threading.local()


def thread_session() -> requests.Session:
    """One keep-alive session per client thread (requests sessions are not thread-safe)."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def _archive_env(model_dir: Path, plans: Mapping[str, str], setup: Setup) -> dict[str, str]:
    """What a peer process needs to load the members (bench/archived.py)."""
    return {
        **os.environ,
        "BENCH_MODEL_DIR": str(model_dir),
        PLANS_ENV: json.dumps(dict(plans)),
        "BENCH_MEMBER_THREADS": str(setup.member_threads),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT.resolve()), os.environ.get("PYTHONPATH")])),
    }


@contextmanager
def flask(model_dir: Path, plans: Mapping[str, str], setup: Setup, images: Sequence[bytes]) -> Iterator[Send]:
    """The FlexServe-style baseline on gunicorn: `setup.units` worker processes (Flask has no batching)."""
    with gunicorn(model_dir, plans, setup) as url:
        yield lambda indices: body_answers(post_images(thread_session(), url, [images[i] for i in indices], {}))


@contextmanager
def gunicorn(model_dir: Path, plans: Mapping[str, str], setup: Setup) -> Iterator[str]:
    """bench/flask_server.py on the extracted archive `model_dir`, members on `plans`; yields its /predict URL."""
    executable = Path(sys.executable).parent / "gunicorn"
    command = [
        str(executable),
        "-w",
        str(setup.units),
        "-b",
        f"127.0.0.1:{FLASK_PORT}",
        "--timeout",
        "120",
        "bench.flask_server:create_app()",
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            env=_archive_env(model_dir, plans, setup),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_for(f"http://127.0.0.1:{FLASK_PORT}/health", process)
            yield f"http://127.0.0.1:{FLASK_PORT}/predict"
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            return requests.get(url, timeout=5).ok
        except requests.RequestException:  # Not listening yet, or its workers still loading.
            return False

    wait_for(ready, f"{url} answering", 120, every_s=0.5)


@contextmanager
def pytriton(model_dir: Path, plans: Mapping[str, str], setup: Setup, images: Sequence[bytes]) -> Iterator[Send]:
    """Triton's frontend and dynamic batcher through PyTriton (bench/triton_server.py, in .venv-triton).

    One request of N images is one KServe v2 inference request of N rows of the BYTES input `image`
    (binary tensor extension); each row of the output `result` is that image's rendered prediction.
    Triton batches rows, not requests: `setup.max_batch` requests of the largest request's images.
    """
    if not TRITON_PYTHON.exists():
        raise RuntimeError(
            f"{TRITON_PYTHON} is missing: `make bench` builds .venv-triton from bench/requirements-triton.txt"
        )
    settings = {
        "BENCH_TRITON_INSTANCES": setup.units,
        "BENCH_TRITON_BATCHER": int(setup.max_batch > 1),
        # Rows: `max_batch` requests of the largest request's images, and never under 64, the most a request may carry.
        "BENCH_TRITON_MAX_BATCH": max(setup.max_batch, 4) * LARGEST_REQUEST,
        "BENCH_TRITON_DELAY_US": setup.delay_ms * 1000,
    }
    env = _archive_env(model_dir, plans, setup) | {key: str(value) for key, value in settings.items()}
    command = [str(TRITON_PYTHON), "-m", "bench.triton_server"]
    base = f"http://127.0.0.1:{TRITON_PORT}/v2/models/ensemble"
    # Triton.serve() shuts the server and its Python stubs down on SIGINT.
    ports = (TRITON_PORT, TRITON_PORT + 1, TRITON_PORT + 2)
    with _server(command, env, f"{base}/ready", "triton", ports=ports, stop_signal=signal.SIGINT):
        yield lambda indices: _triton_infer(thread_session(), f"{base}/infer", [images[i] for i in indices])


def _triton_infer(session: requests.Session, url: str, images: list[bytes]) -> list[Answer]:
    """One v2 inference request: a JSON header, then the BYTES tensor (4-byte little-endian length + data per row)."""
    tensor = b"".join(struct.pack("<I", len(data)) + data for data in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(images), 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
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
    return [entry_answer(json.loads(row)) for row in output["data"]]


@contextmanager
def ray(model_dir: Path, plans: Mapping[str, str], setup: Setup, images: Sequence[bytes]) -> Iterator[Send]:
    """Ray Serve with `@serve.batch` (bench/ray_server.py): a private local Ray, dashboard off, HTTP on 127.0.0.1.

    It takes the Flask baseline's bodies (raw for one image, multipart for several) and answers with
    the rendered body.
    """
    settings = {
        "BENCH_RAY_REPLICAS": setup.units,
        "BENCH_RAY_MAX_BATCH": setup.max_batch,
        "BENCH_RAY_WAIT_S": setup.delay_ms / 1000,
        "RAY_USAGE_STATS_ENABLED": 0,
    }
    env = _archive_env(model_dir, plans, setup) | {key: str(value) for key, value in settings.items()}
    command = [sys.executable, "-m", "bench.ray_server"]
    url = f"http://127.0.0.1:{RAY_PORT}"
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:  # Short: Ray's socket paths live under it.
        env["BENCH_RAY_TMP"] = folder
        with _server(command, env, f"{url}/health", "ray serve", ports=(RAY_PORT,), stop_signal=signal.SIGTERM):
            yield lambda indices: body_answers(
                post_images(thread_session(), f"{url}/predict", [images[i] for i in indices], {})
            )


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
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
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
            raise RuntimeError(
                f"{name}: port {port} on 127.0.0.1 is in use (a server left from an earlier run?)"
            ) from error


def _wait_ready(url: str, process: subprocess.Popen[bytes], name: str, log: Any, limit_s: float = 180) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{tail}")
        try:
            return requests.get(url, timeout=5).ok
        except requests.RequestException:  # Not listening yet, or the model not loaded yet.
            return False

    wait_for(ready, f"{name}: {url} answering", limit_s, every_s=0.5)
