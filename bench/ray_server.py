"""Contender: Ray Serve with `@serve.batch`, all members in one deployment.

Run by bench/contenders.py as `python -m bench.ray_server` with the ensemble's extracted archive and each
member's plan in the environment (bench/archived.py: the same member files, plans and thread settings as
ours). It starts a private local Ray (as many logical CPUs as cores, dashboard off, its files under
BENCH_RAY_TMP; contenders.py gives it a temporary folder and turns usage stats off), deploys the ensemble
with Serve's HTTP proxy on 127.0.0.1:38300, and on SIGTERM or SIGINT shuts Serve and Ray down. It takes
the Flask baseline's bodies at POST /predict (the raw image for one, multipart for several) and answers
with `ensemble.render(...)`'s JSON, from the same decode, transform, member and rendering code as our
handler, so the comparison isolates the serving stack. GET /health answers once the replicas are up.

Each HTTP request is one call of the `@serve.batch` method, whose batch is decoded, run through the
members at once and rendered per request (on a thread, so the replica's event loop keeps taking
requests). Serve forms the next batch as soon as its first call arrives, while the previous batch still
runs (batches then queue behind `max_concurrent_batches` = 1).

Configuration (env, set by bench/contenders.py from the tuned setup of bench/search.py): replicas
[BENCH_RAY_REPLICAS], each holding cores / replicas logical CPUs and running its members side by side on
BENCH_MEMBER_THREADS threads of 1 intra-op thread; `max_batch_size` [BENCH_RAY_MAX_BATCH] calls and
`batch_wait_timeout_s` [BENCH_RAY_WAIT_S]; `max_ongoing_requests` 64, so that queued requests reach the
replica instead of waiting in the proxy; Serve's access log off, as in our TorchServe configuration.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from bench.archived import archived_ensemble
from handlers.inputs.images import decode_image

PORT = 38300
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # No line per request, as in our TorchServe config.


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


@serve.deployment(max_ongoing_requests=64, logging_config=QUIET)
class EnsembleDeployment:
    """Every member of one ensemble in one replica."""

    def __init__(
        self, model_dir: str, plans: dict[str, str], member_threads: int, max_batch: int, wait_s: float
    ) -> None:
        self.answer.set_max_batch_size(max_batch)
        self.answer.set_batch_wait_timeout_s(wait_s)
        self.ensemble = archived_ensemble(Path(model_dir), plans, member_threads)
        self.spec = self.ensemble.spec

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


def main() -> None:
    model_dir = str(Path(os.environ["BENCH_MODEL_DIR"]).resolve())
    plans = json.loads(os.environ["BENCH_PLANS"])
    replicas = int(_setting("BENCH_RAY_REPLICAS", "1"))
    member_threads = int(_setting("BENCH_MEMBER_THREADS", "2"))
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
        # @serve.deployment made the class a Deployment; mypy keeps a class decorator's input type.
        deployment: Any = EnsembleDeployment
        app = deployment.options(
            num_replicas=replicas,
            ray_actor_options={"num_cpus": cores / replicas},
        ).bind(model_dir, plans, member_threads, max_batch, wait_s)
        serve.run(app, name="ensemble", route_prefix="/")
        print(f"ray serve ready on 127.0.0.1:{PORT}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
