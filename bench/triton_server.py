"""Contender: Triton Inference Server's frontend and dynamic batcher, through PyTriton 0.7, all members in one
Python model.

This is not Triton's ONNX Runtime backend: PyTriton runs a Python proxy backend that hands each batch to the
inference callable below, in this process, which runs our member code (bench/archived.py: the archive's files,
each member on the plan ours serves, with ours' thread settings, or every member eager). Run by
bench/contenders.py as `.venv-triton/bin/python -m bench.triton_server`, in its own venv made with Debian's
/usr/bin/python3.11 (`make bench` builds it from bench/requirements-triton.txt): PyTriton's Python backend
stub links the system libpython3.11 and fails under another 3.11 build. Loading the archive rather than
ensembles.yaml keeps that venv free of the packages other ensembles' members need (timm, transformers).
CPU only; HTTP on 127.0.0.1:38200, gRPC on :38201, metrics on :38202.

Model `ensemble`: input `image`, BYTES [-1, 1], one row per encoded image (a request of N images is N
rows); output `result`, BYTES [-1, 1], per image the JSON of its entry in `ensemble.render(...)`'s
`predictions` (its label and score under the ensemble's default policy, and each member's). Triton's
dynamic batcher merges queued requests; the inference callable gets them as a list, decodes every
image, runs the members once on the whole batch, and renders each request's slice, as our handler does.

Configuration (env, set by bench/contenders.py from the tuned setup of bench/search.py): model instances
[BENCH_TRITON_INSTANCES], each running its members side by side on BENCH_MEMBER_THREADS threads of 1
intra-op thread; max_batch_size in rows [BENCH_TRITON_MAX_BATCH]; the dynamic batcher's queue delay
[BENCH_TRITON_DELAY_US], or no dynamic batcher at all [BENCH_TRITON_BATCHER=0]: each request then runs alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.archived import from_environment
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

MODEL = "ensemble"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 38200, 38201, 38202


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def make_infer(ensemble: Ensemble):
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


def main() -> None:
    ensembles = [from_environment() for _ in range(_setting("BENCH_TRITON_INSTANCES", 1))]
    batcher = DynamicBatcher(max_queue_delay_microseconds=_setting("BENCH_TRITON_DELAY_US", 0))
    model_config = ModelConfig(
        max_batch_size=_setting("BENCH_TRITON_MAX_BATCH", 64),
        batcher=batcher if _setting("BENCH_TRITON_BATCHER", 1) else None,
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
