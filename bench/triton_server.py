"""Contender (E): Triton Inference Server with dynamic batching, through PyTriton, all members in one Python model.

Run by bench/contenders.py as `.venv-triton/bin/python -m bench.triton_server` with BENCH_TRITON_MODEL_DIR (the
ensemble's archive, extracted) and BENCH_TRITON_PLAN (`eager` or `onnxruntime`), in its own venv made with Debian's
/usr/bin/python3.11 (`make bench` builds it from bench/requirements-triton.txt): PyTriton's Python
backend stub links the system libpython3.11 and fails under another 3.11 build. It uses the same
decode, transform, member and rendering code as our handler and the Flask baseline, so the comparison
isolates the serving stack; like Flask's, its members run as given (eager), or as ONNX Runtime sessions on the
archive's exports, the `triton_onnxruntime` contender: what a Triton user would deploy. Loading the archive
rather than ensembles.yaml keeps the venv free of the packages other ensembles' members need (timm, transformers). CPU only; HTTP on 127.0.0.1:38200, gRPC on :38201, metrics on :38202.

Model `ensemble`: input `image`, BYTES [-1, 1], one row per encoded image (a request of N images is N
rows); output `result`, BYTES [-1, 1], per image the JSON of its entry in `ensemble.render(...)`'s
`predictions` (its label and score under the ensemble's default policy, and each member's). Triton's
dynamic batcher merges queued requests; the inference callable gets them as a list, decodes every
image, runs the members once on the whole batch, and renders each request's slice, as our handler does.

Configuration (env overrides in brackets), the fairest to Triton found on 2 cores: one model instance
[BENCH_TRITON_INSTANCES=1] whose members run side by side on 2 threads of 1 intra-op thread each
[BENCH_TRITON_MEMBER_THREADS=2, BENCH_THREADS=1], as in our worker; max_batch_size 64 rows
[BENCH_TRITON_MAX_BATCH], so that concurrent 16-image requests batch together (Triton refuses a request
of more rows than that); no queue delay [BENCH_TRITON_DELAY_US=0]: the dynamic batcher takes what queued
while the previous batch ran, so batches grow with the load at no cost to a lone client.

Tried on this machine, images/s at 1 client x 1 image / 8 clients x 1 image / 2 clients x 16 images
(torchvision-trio 20 / 80 / 8 requests, demo-shapes 40 / 160 / 16; each configuration once; 2 cores
shared with other work, about +-10%):

| configuration | torchvision-trio | demo-shapes |
|---|---|---|
| **1 instance, 2 member threads, no delay (kept)** | 18.8 / 26.0 / 31.4 | 70.5 / 156.0 / 388.4 |
| 1 instance, 2 member threads, 2 ms queue delay | 18.7 / 26.4 / 27.2 | 62.6 / 139.7 / 492.2 |
| 2 instances of 1 member thread each | 13.1 / 25.9 / 29.6 | 56.2 / 146.4 / 495.4 |
| 1 instance, 2 intra-op threads, members in turn | 12.6 / 20.6 / 24.6 | 53.7 / 105.6 / 263.3 |
| (Flask + gunicorn, same hour, 20 / 80 / 8 requests) | 13.6 / 27.2 / 14.8 (with a core taken at 2 x 16) | 73.3 / 151.9 / 564.3 |
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from handlers.config.files import read_archive_manifest
from handlers.ensemble import Ensemble
from handlers.execution.engines import archived_exports
from handlers.inputs.images import decode_image
from handlers.weights.loading import load_archived_members

MODEL = "ensemble"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 38200, 38201, 38202

def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def make_infer(ensemble: Ensemble):  # noqa: ANN201 (PyTriton's callable type is private)
    """The inference callable: a list of requests (each {"image": [n, 1] bytes}) in, one result list out."""
    spec = ensemble.spec

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        counts = [len(request["image"]) for request in requests]
        images = [decode_image(bytes(row[0]), spec.limits) for request in requests for row in request["image"]]
        probs = ensemble.probabilities(images)
        replies, offset = [], 0
        for count in counts:
            body = ensemble.render(probs[:, offset : offset + count], spec.policy)
            rows = [json.dumps(entry).encode() for entry in body["predictions"]]
            replies.append({"result": np.array(rows, dtype=np.object_).reshape(count, 1)})
            offset += count
        return replies

    return infer


def on_plan(model_dir: Path, plan: str, member_threads: int) -> Ensemble:
    """The extracted archive's members, every one on `plan`: `eager` (as given), or `onnxruntime` (its ONNX export on
    ONNX Runtime, Triton's own backend for such models, so the peer runs what a Triton user would deploy)."""
    manifest = read_archive_manifest(model_dir)
    return Ensemble(
        manifest.ensemble.with_plan(plan), load_archived_members(manifest, model_dir), torch.device("cpu"),
        manifest.build, manifest.sources, parallelism=member_threads,
        exported=archived_exports(manifest.engines, model_dir),
    )  # fmt: skip


def main() -> None:
    instances = _setting("BENCH_TRITON_INSTANCES", 1)
    torch.set_num_threads(_setting("BENCH_THREADS", 1))
    member_threads = _setting("BENCH_TRITON_MEMBER_THREADS", 2)
    model_dir, plan = Path(os.environ["BENCH_TRITON_MODEL_DIR"]), os.environ.get("BENCH_TRITON_PLAN", "eager")
    ensembles = [on_plan(model_dir, plan, member_threads) for _ in range(instances)]
    model_config = ModelConfig(
        max_batch_size=_setting("BENCH_TRITON_MAX_BATCH", 64),
        batcher=DynamicBatcher(max_queue_delay_microseconds=_setting("BENCH_TRITON_DELAY_US", 0)),
    )
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=HTTP_PORT,
        grpc_address="127.0.0.1",
        grpc_port=GRPC_PORT,
        metrics_address="127.0.0.1",
        metrics_port=METRICS_PORT,
        allow_gpu_metrics=False,
        log_verbose=0,
        exit_timeout_secs=5,
    )

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # Triton.serve() stops the server and its stubs on KeyboardInterrupt.

    signal.signal(signal.SIGTERM, interrupt)
    with Triton(config=triton_config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[make_infer(e) for e in ensembles],
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="result", dtype=bytes, shape=(1,))],
            config=model_config,
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
