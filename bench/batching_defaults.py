"""How workers, batch size and max batch delay trade latency for throughput on the demo ensemble.

Usage: python -m bench.batching_defaults [--quick]   (after `make demo`; `make bench-batching` does both)

Builds the demo ensemble once per configuration (the handler sizes its member threads from the
archive's `workers`), starts a private TorchServe on 127.0.0.1 (shifted ports, own temp dir),
registers each in turn and sends single-image requests at concurrency 1 and 8: a fixed number per
point, each with a timeout. Ratios are against the first configuration (2 workers, no batching)
measured in the same invocation. Writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop, unregister
from bench.loadgen import p50_p99_ms
from handlers.config.files import load_ensembles

# (workers, batch size, max batch delay ms); the first is the baseline.
CONFIGS = [(2, 1, 0), (2, 4, 5), (1, 8, 5), (1, 8, 2), (1, 8, 1), (1, 8, 0)]
RESULTS = Path(__file__).parent / "results" / "batching.json"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| workers | batch size | max delay | concurrency | images/s | p50 ms | p99 ms | requests per batch "
        "| images/s vs baseline | p50 vs baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['batch_size']} | {r['max_batch_delay_ms']} ms | {r['concurrency']} | "
            f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch_requests']:.2f} | "
            f"{r['throughput_vs_baseline']:.2f}x | {r['p50_vs_baseline']:.2f}x |"
        )
    return "\n".join(lines)


def measure(server: Server, name: str, image: bytes, concurrency: int, count: int) -> dict[str, float]:
    """Send `count` requests from `concurrency` threads; every answer must be a 200."""
    headers = {**server.headers("inference"), "Content-Type": "image/png"}

    def one(_: int) -> tuple[float, int]:
        begin = time.perf_counter()
        response = requests.post(f"{server.inference}/predictions/{name}", data=image, headers=headers, timeout=30)
        response.raise_for_status()
        return time.perf_counter() - begin, int(response.headers["X-Ensemble-Batch-Requests"])

    begin = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - begin
    p50, p99 = p50_p99_ms([seconds for seconds, _ in results])
    return {
        "images_per_s": count / wall,
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_batch_requests": sum(batch for _, batch in results) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per point")
    args = parser.parse_args()
    counts = {1: 60, 8: 160} if args.quick else {1: 150, 8: 400}
    image = Path("artifacts/samples/present.png").read_bytes()
    spec = load_ensembles(Path("ensembles.yaml"))["shapes"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        store = Path(folder) / "model_store"
        server = private_server(Path(folder) / "server", store, port_offset=20100)
        try:
            store.mkdir()
            start(server, store)
            for workers, batch_size, delay in CONFIGS:
                name = f"shapes-w{workers}-b{batch_size}-d{delay}"
                batching = replace(spec.batching, workers=workers, batch_size=batch_size, max_batch_delay_ms=delay)
                build_archive(replace(spec, name=name, batching=batching), store)
                register(server, name, workers)
                measure(server, name, image, 2, 20)
                for concurrency, count in counts.items():
                    point = measure(server, name, image, concurrency, count)
                    rows.append(
                        {
                            "workers": workers,
                            "batch_size": batch_size,
                            "max_batch_delay_ms": delay,
                            "concurrency": concurrency,
                            **point,
                        }
                    )
                unregister(server, name)
        finally:
            stop(server)
    baseline = {row["concurrency"]: row for row in rows[: len(counts)]}
    for row in rows:
        base = baseline[row["concurrency"]]
        row["throughput_vs_baseline"] = row["images_per_s"] / base["images_per_s"]
        row["p50_vs_baseline"] = row["p50_ms"] / base["p50_ms"]
    print(markdown(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.write_text(json.dumps({"machine": machine, "quick": args.quick, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
