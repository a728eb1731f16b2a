"""Contender (F): Ray Serve with `@serve.batch`, all members in one deployment.

Run by bench/contenders.py as `python -m bench.ray_server [config [name]]` (or with BENCH_ENSEMBLES /
BENCH_ENSEMBLE, like bench/flask_server.py). It starts a private local Ray (as many logical CPUs as
cores, dashboard off, its files under BENCH_RAY_TMP; contenders.py gives it a temporary folder and turns
usage stats off), deploys the ensemble with Serve's HTTP proxy on 127.0.0.1:38300, and on SIGTERM or
SIGINT shuts Serve and Ray down. It takes the Flask baseline's bodies at POST /predict (the raw image
for one, multipart for several) and answers with `ensemble.render(...)`'s JSON, from the same decode,
transform, member and rendering code as our handler and the Flask baseline, so the comparison isolates
the serving stack; like Flask's, its members run as given (eager). GET /health answers once the replica
is up.

Each HTTP request is one call of the `@serve.batch` method, whose batch is decoded, run through the
members at once and rendered per request (on a thread, so the replica's event loop keeps taking
requests). Serve forms the next batch as soon as its first call arrives, while the previous batch
still runs (batches then queue behind `max_concurrent_batches` = 1): with no wait, a batch holds only
the calls that arrived together, and the benchmark's closed-loop clients get batches of one.

Configuration (env overrides in brackets), chosen for 2 cores: one replica [BENCH_RAY_REPLICAS=1]
holding every logical CPU, whose members run side by side on 2 threads of 1 intra-op thread each
[BENCH_RAY_MEMBER_THREADS=2, BENCH_THREADS=1], as in our worker; `max_batch_size` 8 calls
[BENCH_RAY_MAX_BATCH], the bench's highest concurrency, so that a full round of 8 clients closes a
batch at once; `batch_wait_timeout_s` 0.01 [BENCH_RAY_WAIT_S], Ray's default, which trades some
single-client latency for batches under load; `max_ongoing_requests` 64, so that queued requests reach
the replica instead of waiting in the proxy; Serve's access log off, as in our TorchServe configuration.

Tried on this machine, images/s at 1 client x 1 image / 8 clients x 1 image / 2 clients x 16 images
(20 / 80 / 8 requests, each configuration once; 2 cores shared with other work, about +-10%):

| configuration | torchvision-trio | demo-shapes |
|---|---|---|
| **1 replica, 2 member threads, batch 8, wait 0.01 s (kept)** | 13.1 / 19.8 / 25.6 | 27.7 / 65.8 / 326.6 |
| 1 replica, 2 member threads, batch 16, no wait | 15.0 / 16.7 / 26.3 | 45.6 / 55.3 / 315.3 |
| 1 replica, 2 member threads, batch 16, wait 0.005 s | 15.0 / 19.6 / 26.7 | 35.8 / 66.8 / 344.3 |
| 1 replica, 2 member threads, batch 8, wait 0.02 s | 11.7 / 22.7 / 25.4 | 20.7 / 89.7 / 285.1 |
| 1 replica, 2 member threads, batch 8, wait 0.05 s | 8.0 / 23.1 / 25.7 | |
| 2 replicas of 1 thread, batch 16, no wait | 10.3 / 20.8 / 23.0 | |
| 2 replicas of 1 thread, batch 8, wait 0.02 s | 9.0 / 23.1 / 26.8 | 22.3 / 91.2 / 339.4 |
| 1 replica, 2 intra-op threads, members in turn, no wait | 9.5 / 10.5 / 23.0 | |

No setting wins everywhere: a longer wait buys throughput at 8 clients with single-client latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

PORT = 38300
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # No line per request, as in our TorchServe config.


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


@serve.deployment(max_ongoing_requests=64, logging_config=QUIET)
class EnsembleDeployment:
    """Every member of one ensemble in one replica."""

    def __init__(self, config: str, name: str, threads: int, member_threads: int, max_batch: int, wait_s: float) -> None:
        torch.set_num_threads(threads)
        self.answer.set_max_batch_size(max_batch)
        self.answer.set_batch_wait_timeout_s(wait_s)
        self.spec = load_ensembles(Path(config))[name]
        self.ensemble = Ensemble.from_spec(self.spec.with_plan("eager"), torch.device("cpu"), parallelism=member_threads)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET":
            return PlainTextResponse("ok")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            parts = [await part.read() for _, part in form.multi_items() if not isinstance(part, str)]
        else:
            parts = [await request.body()]
        body = await self.answer(parts)
        return Response(json.dumps(body), media_type="application/json")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # Set again in __init__ from the settings.
    async def answer(self, requests: list[list[bytes]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._answer_batch, requests)

    def _answer_batch(self, requests: list[list[bytes]]) -> list[dict[str, Any]]:
        images = [decode_image(data, self.spec.limits) for parts in requests for data in parts]
        probs = self.ensemble.probabilities(images)
        bodies, offset = [], 0
        for parts in requests:
            bodies.append(self.ensemble.render(probs[:, offset : offset + len(parts)], self.spec.policy))
            offset += len(parts)
        return bodies


def main(argv: list[str]) -> None:
    config = str(Path(argv[0] if argv else os.environ["BENCH_ENSEMBLES"]).resolve())
    name = argv[1] if len(argv) > 1 else os.environ["BENCH_ENSEMBLE"]
    replicas = int(_setting("BENCH_RAY_REPLICAS", "1"))
    threads = int(_setting("BENCH_THREADS", "1"))
    member_threads = int(_setting("BENCH_RAY_MEMBER_THREADS", "2"))
    max_batch = int(_setting("BENCH_RAY_MAX_BATCH", "8"))
    wait_s = float(_setting("BENCH_RAY_WAIT_S", "0.01"))
    stop = threading.Event()
    cores = os.cpu_count() or 1
    ray.init(
        address="local",  # A new private cluster, never one that `ray start` left running.
        num_cpus=cores,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=os.environ.get("BENCH_RAY_TMP"),  # Its sessions, sockets and logs (default /tmp/ray).
    )
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):  # After ray.init, which installs its own handlers.
            signal.signal(signum, lambda *_: stop.set())
        serve.start(http_options={"host": "127.0.0.1", "port": PORT}, logging_config=QUIET)
        app = EnsembleDeployment.options(
            num_replicas=replicas,
            ray_actor_options={"num_cpus": cores / replicas},
        ).bind(config, name, threads, member_threads, max_batch, wait_s)
        serve.run(app, name="ensemble", route_prefix="/")
        print(f"ray serve ready on 127.0.0.1:{PORT}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
