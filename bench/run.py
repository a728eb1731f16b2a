"""Side-by-side benchmark: ceiling, ours, Flask + gunicorn and TorchServe fan-out, on the same images and cores.

Usage: python -m bench.run [--quick]   (`make bench`, `make bench-quick`)

For each workload and load point it prints images/s, p50 and p99 latency, errors and mismatches
(answers whose member labels differ from the in-process reference), with ratios of ours against the
in-process ceiling and against Flask measured in this same invocation, and writes
bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch

from bench.contenders import ceiling, flask_gunicorn, torchserve
from bench.loadgen import LoadPoint, requests_for, run_load
from bench.workloads import Workload, demo, torchvision_trio

RESULTS = Path(__file__).parent / "results" / "latest.json"
CONTENDERS = ("ceiling", "ours", "flask", "fanout")


@dataclass(frozen=True)
class Point:
    """A load shape: clients sending requests of `images` images each."""

    name: str
    clients: int
    images: int
    requests: int
    quick_requests: int
    ceiling_batch: int
    ceiling_processes: int


POINTS = (
    Point("c1 x1 image", clients=1, images=1, requests=100, quick_requests=30, ceiling_batch=1, ceiling_processes=1),
    Point("c8 x1 image", clients=8, images=1, requests=400, quick_requests=120, ceiling_batch=8, ceiling_processes=2),
    Point("c2 x16 images", clients=2, images=16, requests=40, quick_requests=10, ceiling_batch=16, ceiling_processes=2),
)


def measure(workload: Workload, quick: bool) -> dict[str, dict[str, LoadPoint]]:
    """Every contender at every load point, one contender at a time so each has every core."""
    results: dict[str, dict[str, LoadPoint]] = {p.name: {} for p in POINTS}
    cores = torch.get_num_threads()
    for point in POINTS:
        count = point.quick_requests if quick else point.requests
        threads = max(1, cores // point.ceiling_processes)
        results[point.name]["ceiling"] = ceiling(
            workload, point.ceiling_batch, point.ceiling_processes, threads, count * point.images
        )
        print(f"  {workload.name} / {point.name} / ceiling: {results[point.name]['ceiling'].images_per_s:.1f} images/s", flush=True)
    servers = {
        "ours": lambda: torchserve(workload, fan_out=False),
        "flask": lambda: flask_gunicorn(workload, workload.config),
        "fanout": lambda: torchserve(workload, fan_out=True),
    }
    for name, serve in servers.items():
        with serve() as send:
            for point in POINTS:
                count = point.quick_requests if quick else point.requests
                batches = requests_for(count, point.images, len(workload.images))
                run_load(send, batches[: 2 * point.clients], workload.expected, clients=point.clients, deadline_s=60)
                results[point.name][name] = run_load(send, batches, workload.expected, clients=point.clients, deadline_s=300)
                print(f"  {workload.name} / {point.name} / {name}: {results[point.name][name].images_per_s:.1f} images/s", flush=True)
    return results


def report(all_results: dict[str, dict[str, dict[str, LoadPoint]]]) -> tuple[str, dict]:
    lines = [
        "| workload | load | contender | images/s | p50 ms | p99 ms | errors | mismatches | ours vs ceiling | ours vs flask |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    data: dict = {}
    for workload, points in all_results.items():
        data[workload] = {}
        for point, contenders in points.items():
            ours, flask, top = contenders["ours"], contenders["flask"], contenders["ceiling"]
            data[workload][point] = {}
            for name in CONTENDERS:
                row = contenders[name].to_json()
                if name == "ours":
                    row["ratio_vs_ceiling"] = ours.images_per_s / top.images_per_s
                    row["ratio_vs_flask"] = ours.images_per_s / flask.images_per_s
                    row["p50_vs_flask"] = ours.p50_ms / flask.p50_ms
                    row["ratio_vs_fanout"] = ours.images_per_s / contenders["fanout"].images_per_s
                data[workload][point][name] = row
                ratios = (f"{row['ratio_vs_ceiling']:.2f}x", f"{row['ratio_vs_flask']:.2f}x") if name == "ours" else ("", "")
                lines.append(
                    f"| {workload} | {point} | {name} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                    f"{row['errors']} | {row['mismatches']} | {ratios[0]} | {ratios[1]} |"
                )
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per load point (a few minutes)")
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-workload-") as folder:
        workloads = [torchvision_trio(Path(folder), 64), demo(64)]
        all_results = {w.name: measure(w, args.quick) for w in workloads}
    table, data = report(all_results)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "quick": args.quick,
                "seconds": round(time.perf_counter() - began, 1),
                "machine": {"cores": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
                "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "torchserve", "flask", "gunicorn")},
                "workloads": data,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
