"""Where the cores go when our ensemble serves single images at concurrency 8: a CPU profile by process.

Usage: python -m bench.cpu_profile [--requests N]   (`make bench-profile`)

Serves the torchvision trio (as in `make bench`) on a private TorchServe, sends N single-image
requests from 8 client threads, and reads the CPU time each process spent meanwhile: the load
generator (this process), TorchServe's Java frontend, and the Python worker. The worker's time is
compared with the in-process cost of the same images (decode, transform, three members at batch 8,
one thread), measured in this same run. Writes bench/results/cpu_profile.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
import torch

from bench.contenders import ensemble_sender, serving
from bench.loadgen import requests_for, run_load
from bench.workloads import torchvision_trio
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results" / "cpu_profile.json"
CLIENTS = 8


def cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def in_process_cpu_ms_per_image(ensemble: Ensemble, images: tuple[bytes, ...], batch: int = 8) -> float:
    """Decode, transform and run the members on one thread, batch by batch: CPU ms per image."""
    torch.set_num_threads(1)
    limits = ensemble.spec.limits
    ensemble.probabilities([decode_image(images[0], limits)])
    begin = time.process_time()
    for start in range(0, len(images), batch):
        ensemble.probabilities([decode_image(data, limits) for data in images[start : start + batch]])
    return 1000 * (time.process_time() - begin) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        workload = torchvision_trio(Path(folder), 64)
        reference = in_process_cpu_ms_per_image(Ensemble.from_spec(workload.spec, torch.device("cpu")), workload.images)
        with serving([workload.spec]) as server:
            models = requests.get(f"{server.management}/models/{workload.spec.name}", headers=server.headers("management"), timeout=30)
            worker = psutil.Process(int(models.json()[0]["workers"][0]["pid"]))
            [frontend] = [p for p in psutil.process_iter(["cmdline"]) if "org.pytorch.serve.ModelServer" in " ".join(p.info["cmdline"] or [])]
            here = psutil.Process()
            send = ensemble_sender(server, workload.spec.name, workload.images)
            batches = requests_for(args.requests, 1, len(workload.images))
            run_load(send, batches[: 2 * CLIENTS], workload.expected, clients=CLIENTS, deadline_s=60)
            before = {name: cpu_s(p) for name, p in (("clients", here), ("frontend", frontend), ("worker", worker))}
            began = time.perf_counter()
            point = run_load(send, batches, workload.expected, clients=CLIENTS, deadline_s=600)
            wall = time.perf_counter() - began
            spent = {name: cpu_s(p) - before[name] for name, p in (("clients", here), ("frontend", frontend), ("worker", worker))}
    images = point.requests - point.errors
    cores = psutil.cpu_count()
    rows = {name: {"cpu_ms_per_image": 1000 * seconds / images, "share_of_cores": seconds / (wall * cores)} for name, seconds in spent.items()}
    rows["idle"] = {"cpu_ms_per_image": None, "share_of_cores": 1 - sum(r["share_of_cores"] for r in rows.values())}
    lines = ["| process | CPU ms per image | share of the cores |", "|---|---:|---:|"]
    for name, row in rows.items():
        per_image = "" if row["cpu_ms_per_image"] is None else f"{row['cpu_ms_per_image']:.1f}"
        lines.append(f"| {name} | {per_image} | {100 * row['share_of_cores']:.0f}% |")
    lines.append(f"| in-process reference (decode + transform + members, batch 8, 1 thread) | {reference:.1f} | |")
    print("\n".join(lines))
    print(f"{point.images_per_s:.1f} images/s at concurrency {CLIENTS}, {point.errors} errors, {point.mismatches} mismatches")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": cores,
        "images_per_s": point.images_per_s,
        "errors": point.errors,
        "mismatches": point.mismatches,
        "in_process_cpu_ms_per_image": reference,
        "processes": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
