"""Where the cores go when our ensemble serves a load: a CPU profile by process.

Usage: python -m bench.cpu_profile [--requests N] [--workload trio|shapes] [--clients C] [--images I]
(`make bench-profile`: the trio, 8 clients x 1 image; `make bench-profile PROFILE_ARGS='--workload shapes
--clients 2 --images 16'`: the demo at 2 clients x 16 images)

Serves the workload (as in `make bench`) on a private TorchServe, sends N requests of I images from C
client threads, and reads the CPU time each process spent meanwhile: the load generator (this process),
TorchServe's Java frontend, and the Python workers. The workers' time is compared with the in-process
cost of the same images (decode, transform, the members at batch 8, one thread, the plans the archive's
workers choose), measured in this same run. Writes bench/results/cpu_profile[-<workload>].json.
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

from bench.contenders import ensemble_sender, extracted_archive, serving
from bench.loadgen import requests_for, run_load
from bench.workloads import demo, torchvision_trio
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results"


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
    parser.add_argument("--workload", choices=("trio", "shapes"), default="trio")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        workload = torchvision_trio(Path(folder), 64) if args.workload == "trio" else demo(64)
        with extracted_archive(workload.spec) as model_dir:
            torch.set_num_threads(1)
            reference = in_process_cpu_ms_per_image(
                Ensemble.from_model_dir(model_dir, torch.device("cpu"), parallelism=1), workload.images
            )
        with serving([workload.spec]) as server:
            models = requests.get(
                f"{server.management}/models/{workload.spec.name}", headers=server.headers("management"), timeout=30
            )
            workers = [psutil.Process(int(worker["pid"])) for worker in models.json()[0]["workers"]]
            [frontend] = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "org.pytorch.serve.ModelServer" in " ".join(p.info["cmdline"] or [])
            ]
            here = psutil.Process()
            processes = {"clients": [here], "frontend": [frontend], "workers": workers}
            send = ensemble_sender(server, workload.spec.name, workload.images)
            batches = requests_for(args.requests, args.images, len(workload.images))
            run_load(send, batches[: 2 * args.clients], workload.expected, clients=args.clients, deadline_s=60)
            before = {name: sum(cpu_s(p) for p in group) for name, group in processes.items()}
            began = time.perf_counter()
            point = run_load(send, batches, workload.expected, clients=args.clients, deadline_s=600)
            wall = time.perf_counter() - began
            spent = {name: sum(cpu_s(p) for p in group) - before[name] for name, group in processes.items()}
    images = (point.requests - point.errors) * args.images
    cores = psutil.cpu_count()
    if cores is None:
        raise SystemExit("psutil cannot count this machine's cores")
    rows = {
        name: {"cpu_ms_per_image": 1000 * seconds / images, "share_of_cores": seconds / (wall * cores)}
        for name, seconds in spent.items()
    }
    rows["idle"] = {"cpu_ms_per_image": None, "share_of_cores": 1 - sum(r["share_of_cores"] for r in rows.values())}
    lines = ["| process | CPU ms per image | share of the cores |", "|---|---:|---:|"]
    for name, row in rows.items():
        per_image = "" if row["cpu_ms_per_image"] is None else f"{row['cpu_ms_per_image']:.2f}"
        lines.append(f"| {name} | {per_image} | {100 * row['share_of_cores']:.0f}% |")
    lines.append(f"| in-process reference (decode + transform + members, batch 8, 1 thread) | {reference:.2f} | |")
    print("\n".join(lines))
    print(
        f"{point.images_per_s:.1f} images/s at {args.clients} clients x {args.images} images, "
        f"{point.errors} errors, {point.mismatches} mismatches"
    )
    out = RESULTS / (
        "cpu_profile.json"
        if args.workload == "trio" and args.images == 1
        else f"cpu_profile-{args.workload}-c{args.clients}x{args.images}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "cores": cores,
                "load": {
                    "workload": args.workload,
                    "clients": args.clients,
                    "images_per_request": args.images,
                    "workers": len(workers),
                },
                "images_per_s": point.images_per_s,
                "errors": point.errors,
                "mismatches": point.mismatches,
                "in_process_cpu_ms_per_image": reference,
                "processes": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
