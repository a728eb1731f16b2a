"""What `consistency: batch_invariant` and test-time augmentation cost on the demo, served by one TorchServe.

Usage: python -m bench.answer_options [--quick]   (`make bench-options`; needs `make demo`)

The `shapes` demo is archived four times, differing only in one option: as shipped (`fast`, no
views), `consistency: batch_invariant`, `input.tta: hflip` and `input.tta: ten_crop` on every
member. One private TorchServe on 127.0.0.1 serves all four with the demo's workers and batching.
Two loads: single-image requests from 8 clients (dynamic batching merges them) and 8-image requests
from 2 clients (full batches). Rounds alternate the variants' order; every answer's member labels
are checked against the same variant computed in-process one image at a time.
Writes bench/results/answer_options.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import private_server, register, start, stop
from bench.contenders import ensemble_sender
from bench.loadgen import alternating_rounds, medians, requests_for, run_load
from bench.workloads import Workload, demo, with_expected

RESULTS = Path(__file__).parent / "results" / "answer_options.json"
BASELINE = "fast"
LOADS = {"c8 x 1 image": (8, 1), "c2 x 8 images": (2, 8)}


def variants(workload: Workload) -> dict[str, Workload]:
    """The four archives' workloads, each with its own expected labels."""
    spec = workload.spec
    specs = {
        BASELINE: spec,
        "batch_invariant": replace(spec, name="shapes-invariant", consistency="batch_invariant"),
        "tta hflip": replace(spec.with_views("hflip"), name="shapes-hflip"),
        "tta ten_crop": replace(spec.with_views("ten_crop"), name="shapes-tencrop"),
    }
    return {label: with_expected(label, workload.config, s, workload.images) for label, s in specs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (1, 4.0) if args.quick else (3, 10.0)
    began = time.perf_counter()
    loads = variants(demo(64))
    points: dict[str, dict[str, list[dict[str, float]]]] = {load: {name: [] for name in loads} for load in LOADS}
    with tempfile.TemporaryDirectory(prefix="bench-options-") as folder:
        store = Path(folder) / "model_store"
        for workload in loads.values():
            build_archive(workload.spec, store)
        server = private_server(Path(folder) / "server", store, port_offset=30500)
        try:
            start(server, store)
            for workload in loads.values():
                register(server, workload.spec.name, workload.spec.batching.workers)
            senders = {name: ensemble_sender(server, w.spec.name, w.images) for name, w in loads.items()}
            for name, send in senders.items():
                run_load(send, requests_for(32, 1, 64), loads[name].expected, clients=8, deadline_s=30)
            for load, (clients, per_request) in LOADS.items():
                expected = {name: workload.expected for name, workload in loads.items()}
                points[load] = alternating_rounds(
                    senders,
                    expected,
                    requests_for(100_000, per_request, 64),
                    clients=clients,
                    rounds=rounds,
                    seconds=seconds,
                    load=load,
                )
        finally:
            stop(server)
    throughput, p50 = medians(points, "images_per_s"), medians(points, "p50_ms")
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "quick": args.quick,
        "seconds": round(time.perf_counter() - began, 1),
        "median_images_per_s": {load: {n: round(v, 1) for n, v in by.items()} for load, by in throughput.items()},
        "median_p50_ms": {load: {n: round(v, 1) for n, v in by.items()} for load, by in p50.items()},
        "throughput_vs_fast": {
            load: {n: round(v / by[BASELINE], 3) for n, v in by.items()} for load, by in throughput.items()
        },
        "errors": sum(p["errors"] for by in points.values() for pts in by.values() for p in pts),
        "mismatches": sum(p["mismatches"] for by in points.values() for pts in by.values() for p in pts),
        "rounds": points,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
