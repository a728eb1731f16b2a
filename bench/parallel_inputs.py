"""Should a worker decode and transform a request's images on its member threads? Measured, both ways, one run.

Usage: python -m bench.parallel_inputs [--quick]   (`make bench-inputs`; needs `make demo`)

For the demo ensemble and the torchvision trio, 16-image requests (the benchmark's c2 x16 point):
decode + transform on the calling thread, as the handler does, against the same work spread over
a pool of as many threads as the worker has member threads (Pillow releases the GIL while
decoding and resizing), then the members on the worker's own plans. Best and median of repeated
runs, interleaved so that noise hits both alike. Writes bench/results/parallel_inputs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.workloads import Workload, demo, torchvision_trio
from handlers.config.specs import InputSpec
from handlers.ensemble import Ensemble
from handlers.execution.cores import usable_cores
from handlers.inputs.images import decode_image, to_tensor

RESULTS = Path(__file__).parent / "results" / "parallel_inputs.json"
IMAGES = 16

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


def inputs(workload: Workload, ensemble: Ensemble, mapper: Mapper) -> dict[Any, torch.Tensor]:
    """Decode the request's images and build one batch per input spec, each image's work through `mapper`."""
    if not isinstance(ensemble.spec.input, InputSpec):
        raise SystemExit(f"{workload.name}: this benchmark decodes images; the ensemble takes tensors")
    # The members of an image ensemble take images (the config refuses a tensor input there).
    given = dict.fromkeys(ensemble.spec.member_input(m) for m in ensemble.spec.members)
    specs = [spec for spec in given if isinstance(spec, InputSpec)]

    def one(data: bytes) -> list[torch.Tensor]:
        image = decode_image(data, workload.spec.limits)
        modes: dict[str, Image.Image] = {}
        for spec in specs:
            modes.setdefault(
                spec.color_mode, image if image.mode == spec.color_mode else image.convert(spec.color_mode)
            )
        return [to_tensor(modes[spec.color_mode], spec) for spec in specs]

    per_image = list(mapper(one, workload.images[:IMAGES]))
    return {spec: torch.stack([tensors[i] for tensors in per_image]) for i, spec in enumerate(specs)}


def measure(workload: Workload, rounds: int) -> dict[str, Any]:
    threads = usable_cores()
    ensemble = Ensemble.from_spec(workload.spec, torch.device("cpu"), parallelism=threads)
    ways: dict[str, Mapper] = {"calling thread": map}
    times: dict[str, dict[str, list[float]]] = {}
    with ThreadPoolExecutor(threads) as pool:
        ways["member threads"] = pool.map
        for _ in range(rounds):
            for way, mapper in ways.items():
                began = time.perf_counter()
                batches = inputs(workload, ensemble, mapper)
                prepared = time.perf_counter()
                with torch.inference_mode():
                    for group in ensemble.runner.groups:
                        group.run(batches[group.spec])
                done = time.perf_counter()
                entry = times.setdefault(way, {"inputs": [], "total": []})
                entry["inputs"].append(1000 * (prepared - began))
                entry["total"].append(1000 * (done - began))
    return {
        way: {
            f"{part}_{stat}_ms": round(fn(values), 2)
            for part, values in parts.items()
            for stat, fn in (("best", min), ("median", statistics.median))
        }
        for way, parts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as folder:
        workloads = [demo(IMAGES), torchvision_trio(Path(folder), IMAGES)]
        results = {w.name: measure(w, 10 if args.quick else 40) for w in workloads}
    lines = [
        "| workload | decode + transform on | inputs ms (best / median) | with members ms (best / median) |",
        "|---|---|---:|---:|",
    ]
    for name, ways in results.items():
        for way, row in ways.items():
            lines.append(
                f"| {name} | {way} | {row['inputs_best_ms']:.2f} / {row['inputs_median_ms']:.2f} | "
                f"{row['total_best_ms']:.2f} / {row['total_median_ms']:.2f} |"
            )
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"images_per_request": IMAGES, "cores": os.cpu_count(), "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
