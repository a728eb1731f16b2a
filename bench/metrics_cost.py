"""What emitting the ensemble's counters costs at concurrency 8 on the demo: the same archive with and without them.

Usage: python -m bench.metrics_cost [--quick]   (`make bench-metrics`; needs `make demo`)

Two private TorchServes on 127.0.0.1 serve the same `shapes` archive with `metrics_mode=prometheus`:
one with the shipped `monitoring/metrics.yaml` (the handler emits its counters once per batch), one
with TorchServe's default metrics config (the handler emits none, since none is declared). Rounds
alternate between them, which goes first alternating too, each round a fixed deadline of
single-image requests from 8 clients; every answer is checked against the in-process reference.
Afterwards `/metrics` must show the counters on the first server and not on the second.
Writes bench/results/metrics_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests
import torch
import ts
from prometheus_client.parser import text_string_to_metric_families

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from bench.contenders import ensemble_sender
from bench.loadgen import requests_for, run_load
from bench.workloads import demo

RESULTS = Path(__file__).parent / "results" / "metrics_cost.json"
DEFAULT_METRICS = Path(ts.__file__).parent / "configs" / "metrics.yaml"
VARIANTS = {"counters": None, "no counters": DEFAULT_METRICS}
CLIENTS = 8


@contextmanager
def served(folder: Path, store: Path, offset: int, metrics_config: Path | None, workers: int) -> Iterator[Server]:
    overrides = {"metrics_config": str(metrics_config)} if metrics_config else None
    server = private_server(folder, store, port_offset=offset, overrides=overrides)
    try:
        start(server, store)
        register(server, "shapes", workers)
        yield server
    finally:
        stop(server)


def images_counted(server: Server) -> float | None:
    """ensemble_images_total on the server's /metrics, or None when the counter is not there."""
    text = requests.get(f"{server.setting('metrics_address')}/metrics", timeout=30).text
    counted = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ensemble_images_total" and sample.labels.get("ModelName") == "shapes"
    ]
    return sum(counted) if counted else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (2, 5.0) if args.quick else (6, 12.0)
    began = time.perf_counter()
    workload = demo(64)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder, ExitStack() as stack:
        store = Path(folder) / "model_store"
        build_archive(workload.spec, store)
        servers = {
            name: stack.enter_context(
                served(Path(folder) / f"server{i}", store, 30300 + 40 * i, config, workload.spec.batching.workers)
            )
            for i, (name, config) in enumerate(VARIANTS.items())
        }
        senders = {name: ensemble_sender(server, "shapes", workload.images) for name, server in servers.items()}
        load = requests_for(100_000, 1, len(workload.images))
        for send in senders.values():
            run_load(send, load[:64], workload.expected, clients=CLIENTS, deadline_s=30)
        points: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                point = run_load(senders[name], load, workload.expected, clients=CLIENTS, deadline_s=seconds)
                points[name].append(point.to_json())
                print(
                    f"round {r + 1} {name}: {point.images_per_s:.1f} images/s, p50 {point.p50_ms:.1f} ms, "
                    f"errors {point.errors}, mismatches {point.mismatches}"
                )
        counted = {name: images_counted(server) for name, server in servers.items()}
    medians = {name: statistics.median(p["images_per_s"] for p in pts) for name, pts in points.items()}
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "quick": args.quick,
        "seconds": round(time.perf_counter() - began, 1),
        "clients": CLIENTS,
        "rounds": points,
        "median_images_per_s": {name: round(v, 1) for name, v in medians.items()},
        "throughput_with_counters_vs_without": round(medians["counters"] / medians["no counters"], 3),
        "errors": sum(p["errors"] for pts in points.values() for p in pts),
        "mismatches": sum(p["mismatches"] for pts in points.values() for p in pts),
        "ensemble_images_total_after": counted,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
