"""How TorchServe batch size and max batch delay trade latency for throughput on the demo ensemble.

Usage: python -m bench.batching_defaults [--quick]   (after `make build`; `make bench-batching` does both)

Starts a private TorchServe on 127.0.0.1 (shifted ports, own temp dir), registers model_store/shapes.mar
with each configuration in turn, and sends single-image requests at concurrency 1 and 8: a fixed
number per point, each with a timeout. Ratios are against the unbatched configuration (batch size 1,
no delay) measured in the same invocation. Writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop, unregister

CONFIGS = [(1, 0), (4, 5), (8, 5), (8, 20)]
WORKERS = 2
RESULTS = Path(__file__).parent / "results" / "batching.json"


def measure(server: Server, image: bytes, concurrency: int, count: int) -> dict[str, float]:
    """Send `count` requests from `concurrency` threads; every answer must be a 200."""
    headers = {**server.headers("inference"), "Content-Type": "image/png"}

    def one(_: int) -> tuple[float, int]:
        begin = time.perf_counter()
        response = requests.post(f"{server.inference}/predictions/shapes", data=image, headers=headers, timeout=30)
        response.raise_for_status()
        return time.perf_counter() - begin, int(response.headers["X-Ensemble-Batch-Requests"])

    begin = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - begin
    latencies = sorted(seconds for seconds, _ in results)
    return {
        "images_per_s": count / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "mean_batch_requests": sum(batch for _, batch in results) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per point")
    args = parser.parse_args()
    counts = {1: 60, 8: 160} if args.quick else {1: 150, 8: 400}
    image = Path("artifacts/samples/present.png").read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        server = private_server(Path(folder), Path("model_store"), port_offset=20100)
        try:
            start(server, Path("model_store"))
            for batch_size, delay in CONFIGS:
                register(server, "shapes", WORKERS, batch_size=batch_size, max_batch_delay=delay)
                measure(server, image, 2, 20)
                for concurrency, count in counts.items():
                    point = measure(server, image, concurrency, count)
                    rows.append({"batch_size": batch_size, "max_batch_delay_ms": delay, "concurrency": concurrency, **point})
                unregister(server, "shapes")
        finally:
            stop(server)
    baseline = {row["concurrency"]: row for row in rows if row["batch_size"] == 1}
    for row in rows:
        base = baseline[row["concurrency"]]
        row["throughput_vs_unbatched"] = row["images_per_s"] / base["images_per_s"]
        row["p50_vs_unbatched"] = row["p50_ms"] / base["p50_ms"]
    print("| batch size | max delay | concurrency | images/s | p50 ms | p99 ms | requests per batch | images/s vs unbatched | p50 vs unbatched |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['max_batch_delay_ms']} ms | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['mean_batch_requests']:.2f} | {r['throughput_vs_unbatched']:.2f}x | {r['p50_vs_unbatched']:.2f}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    RESULTS.write_text(json.dumps({"workers": WORKERS, "machine": machine, "quick": args.quick, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
