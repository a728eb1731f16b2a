"""Side-by-side benchmark: in-process ceilings, ours, Flask, TorchServe fan-out, Triton and Ray Serve, on the same images and cores.

Usage: python -m bench.run [--quick]   (`make bench`, `make bench-quick`)

`ours_frozen` is ours with every member on `frozen`, the fastest plan before the engines; `ours_bf16` every member
at `precision: bf16`, calibrated on the workload's images (its mismatches are labels that differ from fp32).
`ceiling_optimized` and `triton_onnxruntime` run the ensemble's archive (its ONNX exports included): the first
with every member on the fastest plan or engine `auto` finds, the second with every member on ONNX Runtime.

For each workload and load point it prints images/s, p50 and p99 latency, errors and mismatches
(answers whose member labels differ from the in-process reference), with ratios of ours against every
other contender measured in this same invocation, and writes bench/results/latest.json.
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

from bench.contenders import ceiling, extracted_archive, flask_gunicorn, ray_serve, torchserve, triton
from bench.loadgen import LoadPoint, requests_for, run_load
from bench.workloads import Workload, demo, torchvision_trio

RESULTS = Path(__file__).parent / "results" / "latest.json"
CONTENDERS = ("ceiling", "ceiling_optimized", "ours", "ours_frozen", "ours_bf16", "flask", "fanout", "triton", "triton_onnxruntime", "ray")
IN_PROCESS = {"ceiling": "eager", "ceiling_optimized": "auto"}


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
    with extracted_archive(workload) as archive:
        return _measure(workload, quick, archive)


def _measure(workload: Workload, quick: bool, archive: Path) -> dict[str, dict[str, LoadPoint]]:
    results: dict[str, dict[str, LoadPoint]] = {p.name: {} for p in POINTS}
    cores = torch.get_num_threads()
    for point in POINTS:
        count = point.quick_requests if quick else point.requests
        threads = max(1, cores // point.ceiling_processes)
        for name, plan in IN_PROCESS.items():
            results[point.name][name] = ceiling(
                workload, point.ceiling_batch, point.ceiling_processes, threads, count * point.images, plan=plan,
                archive=archive if name == "ceiling_optimized" else None,
            )  # fmt: skip
            print(f"  {workload.name} / {point.name} / {name}: {results[point.name][name].images_per_s:.1f} images/s", flush=True)
    servers = {
        "ours": lambda: torchserve(workload, fan_out=False),
        "ours_frozen": lambda: torchserve(workload.on_plan("frozen"), fan_out=False),
        "ours_bf16": lambda: torchserve(workload.at_precision("bf16", archive.parent / "calibration"), fan_out=False),
        "flask": lambda: flask_gunicorn(workload, workload.config),
        "fanout": lambda: torchserve(workload, fan_out=True),
        "triton": lambda: triton(workload, model_dir=archive),
        "triton_onnxruntime": lambda: triton(workload, model_dir=archive, plan="onnxruntime"),
        "ray": lambda: ray_serve(workload),
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
    others = [name for name in CONTENDERS if name != "ours"]
    lines = [
        "| workload | load | contender | images/s | p50 ms | p99 ms | errors | mismatches | " + " | ".join(f"ours vs {n}" for n in others) + " |",
        "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(others),
    ]
    data: dict = {}
    for workload, points in all_results.items():
        data[workload] = {}
        for point, contenders in points.items():
            ours = contenders["ours"]
            data[workload][point] = {}
            for name in CONTENDERS:
                row = contenders[name].to_json()
                if name == "ours":
                    row.update({f"ratio_vs_{n}": ours.images_per_s / contenders[n].images_per_s for n in others})
                    row["p50_vs_flask"] = ours.p50_ms / contenders["flask"].p50_ms
                data[workload][point][name] = row
                ratios = [f"{row[f'ratio_vs_{n}']:.2f}x" if name == "ours" else "" for n in others]
                lines.append(
                    f"| {workload} | {point} | {name} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                    f"{row['errors']} | {row['mismatches']} | " + " | ".join(ratios) + " |"
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
                "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "torchserve", "flask", "gunicorn", "ray")},
                "workloads": data,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
