"""What exact early exit saves on the `shapes` demo served by one TorchServe, and what `uncertainty=true` costs.

Usage: python -m bench.early_exit [--quick]   (`make bench-early-exit`; needs `make demo`)

One archive of `shapes` as shipped, one private TorchServe on 127.0.0.1. The variants differ only in the
request's parameters: `any` and `all`, each exhaustive and with `early_exit=true`, and `any` with
`uncertainty=true`. Two loads on the demo's held-out images: single-image requests from 8 clients, and
16-image requests from 2 clients. Rounds alternate the variants' order. Every answer's combined label is
checked against the exhaustive label computed in-process (eager, every member); the early-exit answers also
tally which members each image skipped. Then the same requests inside one worker, in-process from the same
archive (decode to answer, no HTTP, one thread): the share of a request the members are, which bounds what
skipping them can save end to end. Writes bench/results/early_exit.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import private_server, register, start, stop
from bench.contenders import post_images, thread_session
from bench.loadgen import Labels, Send, alternating_rounds, medians, requests_for, run_load
from bench.workloads import Workload, demo
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results" / "early_exit.json"
IMAGES = 256
LOADS = {"c8 x 1 image": (8, 1), "c2 x 16 images": (2, 16)}
VARIANTS = {
    "any": {"policy": "any"},
    "any early_exit": {"policy": "any", "early_exit": "true"},
    "all": {"policy": "all"},
    "all early_exit": {"policy": "all", "early_exit": "true"},
    "any uncertainty": {"policy": "any", "uncertainty": "true"},
}
# Each variant's baseline: the same policy, every member, no uncertainty.
BASELINES = {"any early_exit": "any", "all early_exit": "all", "any uncertainty": "any"}


def in_worker(
    archive: Path, workload: Workload, expected: dict[str, list[dict[str, str]]], rounds: int
) -> dict[str, Any]:
    """ms per request of each variant and load inside one worker loaded from `archive`; and label mismatches.

    The variants take turns request by request (the order flipping every request), so that the machine's
    drift, which moves round-level figures by 10%, falls on all of them alike; the median over `rounds` passes.
    """
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-early-exit-worker-") as folder:
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(folder)
        ensemble = Ensemble.from_model_dir(Path(folder), torch.device("cpu"), parallelism=1)
        timings: dict[str, dict[str, list[float]]] = {load: {name: [] for name in VARIANTS} for load in LOADS}
        encoded = {name: {key: value.encode() for key, value in params.items()} for name, params in VARIANTS.items()}
        mismatches = 0
        for load, (_, per_request) in LOADS.items():
            plan = requests_for(64 // per_request * 2, per_request, IMAGES)
            for _ in range(rounds):
                spent = dict.fromkeys(VARIANTS, 0.0)
                for number, indices in enumerate(plan):
                    for name in list(VARIANTS) if number % 2 == 0 else list(reversed(VARIANTS)):
                        params = encoded[name]
                        if per_request == 1:
                            row, kind = {"body": workload.images[indices[0]]} | params, {"Content-Type": "image/png"}
                        else:
                            row, kind = (
                                {f"image{i}": workload.images[i] for i in indices} | params,
                                {"Content-Type": "multipart/form-data"},
                            )
                        began = time.perf_counter()
                        [reply] = ensemble.answer_batch([ensemble.prepare(row, kind)]).replies
                        spent[name] += time.perf_counter() - began
                        labels = [p["label"] for p in reply.body["predictions"]]
                        mismatches += sum(
                            got != expected[VARIANTS[name]["policy"]][i]["label"]
                            for got, i in zip(labels, indices, strict=True)
                        )
                for name, seconds in spent.items():
                    timings[load][name].append(seconds * 1000 / len(plan))
        stages = ensemble.runner.stage_order()
    typical = {load: {name: statistics.median(ms) for name, ms in by.items()} for load, by in timings.items()}
    return {
        "stages": stages,
        "median_ms_per_request": {load: {n: round(v, 3) for n, v in by.items()} for load, by in typical.items()},
        "speedup": {
            load: {n: round(by[base] / by[n], 3) for n, base in BASELINES.items()} for load, by in typical.items()
        },
        "mismatches": mismatches,
    }


def exhaustive_labels(workload: Workload, policy: str) -> list[dict[str, str]]:
    """The combined label per image with every member run, in-process on eager."""
    ensemble = Ensemble.from_spec(workload.spec.with_plan("eager"), torch.device("cpu"))
    prepared = ensemble.prepare({"body": workload.images[0], "policy": policy.encode()}, {})
    probs = ensemble.probabilities([decode_image(data, workload.spec.limits) for data in workload.images])
    return [{"label": p["label"]} for p in ensemble.render(probs, prepared.policy)["predictions"]]


class Tally:
    """Member-images run and skipped, summed over the answers of one variant (thread-safe)."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, body: dict) -> None:
        with self._lock:
            for prediction in body["predictions"]:
                self.ran.update(list(prediction["members"]))
                self.skipped.update(prediction.get("skipped", ()))

    def fractions(self) -> dict[str, float]:
        return {m: round(self.skipped[m] / (self.ran[m] + self.skipped[m]), 4) for m in sorted(self.ran | self.skipped)}


def sender(url: str, headers: dict[str, str], images: tuple[bytes, ...], params: dict[str, str], tally: Tally) -> Send:
    """Posts the images with the variant's parameters as X-Ensemble-* headers; answers each image's combined label."""
    asked = {**headers, **{f"X-Ensemble-{key.replace('_', '-')}": value for key, value in params.items()}}

    def send(indices: list[int]) -> Labels:
        body = post_images(thread_session(), url, [images[i] for i in indices], asked)
        tally.add(body)
        return [{"label": p["label"]} for p in body["predictions"]]

    return send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--rounds", type=int, help="rounds per load (default 4, quick 2)")
    parser.add_argument("--seconds", type=float, help="seconds per variant per round (default 10, quick 5)")
    parser.add_argument("--load", choices=list(LOADS), action="append", help="only these loads (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    args = parser.parse_args()
    rounds, seconds = (2, 5.0) if args.quick else (4, 10.0)
    rounds, seconds = args.rounds or rounds, args.seconds or seconds
    loads = {load: LOADS[load] for load in args.load or LOADS}
    began = time.perf_counter()
    workload = demo(IMAGES)
    expected = {policy: exhaustive_labels(workload, policy) for policy in ("any", "all")}
    tallies = {load: {name: Tally() for name in VARIANTS} for load in loads}
    points: dict[str, dict[str, list[dict[str, float]]]] = {load: {name: [] for name in VARIANTS} for load in loads}
    with tempfile.TemporaryDirectory(prefix="bench-early-exit-") as folder:
        store = Path(folder) / "model_store"
        build_archive(workload.spec, store)
        worker = in_worker(store / f"{workload.spec.name}.mar", workload, expected, rounds * 2)
        print("in one worker:", json.dumps({k: v for k, v in worker.items() if k != "stages"}))
        server = private_server(Path(folder) / "server", store, port_offset=30600)
        try:
            start(server, store)
            register(server, workload.spec.name, workload.spec.batching.workers)
            url, headers = f"{server.inference}/predictions/{workload.spec.name}", server.headers("inference")
            for load, (clients, per_request) in loads.items():
                senders = {
                    name: sender(url, headers, workload.images, params, tallies[load][name])
                    for name, params in VARIANTS.items()
                }
                for name, send in senders.items():
                    run_load(
                        send,
                        requests_for(16, per_request, IMAGES),
                        expected[VARIANTS[name]["policy"]],
                        clients=clients,
                        deadline_s=20,
                    )
                labels = {name: expected[params["policy"]] for name, params in VARIANTS.items()}
                points[load] = alternating_rounds(
                    senders,
                    labels,
                    requests_for(100_000, per_request, IMAGES),
                    clients=clients,
                    rounds=rounds,
                    seconds=seconds,
                    load=load,
                )
        finally:
            stop(server)
    throughput, p50 = medians(points, "images_per_s"), medians(points, "p50_ms")
    result = {
        "command": "python -m bench.early_exit " + shlex.join(sys.argv[1:]),
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "quick": args.quick,
        "seconds": round(time.perf_counter() - began, 1),
        "images": IMAGES,
        "positives": {
            policy: sum(e["label"] == workload.spec.positive_label for e in labels)
            for policy, labels in expected.items()
        },
        "median_images_per_s": {load: {n: round(v, 1) for n, v in by.items()} for load, by in throughput.items()},
        "median_p50_ms": {load: {n: round(v, 1) for n, v in by.items()} for load, by in p50.items()},
        "speedup": {
            load: {n: round(by[n] / by[base], 3) for n, base in BASELINES.items()} for load, by in throughput.items()
        },
        "skipped_fraction": {
            load: {n: tallies[load][n].fractions() for n in ("any early_exit", "all early_exit")} for load in loads
        },
        "in_one_worker": worker,
        "errors": sum(p["errors"] for by in points.values() for pts in by.values() for p in pts),
        "mismatches": sum(p["mismatches"] for by in points.values() for pts in by.values() for p in pts),
        "rounds": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
