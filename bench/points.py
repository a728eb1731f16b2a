"""What the benchmark measures: its workloads (with each one's latency objective), its load points, and one
closed-loop measurement of a contender at a point, shared by `make bench` (bench/run.py), its tuning search
(bench/search.py) and `make tune` (bench/tune.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.contenders import CeilingPool
from bench.loadgen import LoadPoint, Send, requests_for, run_load
from bench.reference import GateJudge
from bench.workloads import Workload, demo, torchvision_trio

IMAGES = 64


@dataclass(frozen=True)
class Point:
    """A load shape: clients sending requests of `images` images each (`requests`: make tune's counts)."""

    name: str
    clients: int
    images: int
    requests: int
    quick_requests: int

    @property
    def in_flight(self) -> int:
        """Images in flight at once: all a server could batch, and what the ceiling calls its members on."""
        return self.clients * self.images


POINTS = (
    Point("c1 x1 image", clients=1, images=1, requests=100, quick_requests=30),
    Point("c8 x1 image", clients=8, images=1, requests=400, quick_requests=120),
    Point("c2 x16 images", clients=2, images=16, requests=40, quick_requests=10),
)
CURVE_CLIENTS = (1, 2, 4, 8, 16, 32)
WARM = Point("warm", clients=4, images=1, requests=0, quick_requests=0)  # before anything is timed


@dataclass(frozen=True)
class Bench:
    """A workload of the benchmark: how to make it, its p99 latency objective, and its two disjoint image sets."""

    make: Callable[[Path, int], Workload]
    objective_ms: float
    measure_seed: int
    tune_seed: int

    def workload(self, folder: Path, *, tuning: bool) -> Workload:
        return self.make(folder, self.tune_seed if tuning else self.measure_seed)


# Objectives: a few times the single-image latency on 2 cores (trio about 45 ms, shapes about 5 ms), the budget
# a caller of such a model would set.
BENCHES = {
    "torchvision-trio": Bench(lambda folder, seed: torchvision_trio(folder, IMAGES, seed), 250.0, 31337, 7331),
    "demo-shapes": Bench(lambda _, seed: demo(IMAGES, seed), 50.0, 4242, 2424),
}


def closed(send: Send, judge: GateJudge, point: Point, seconds: float, count: int = 100_000) -> LoadPoint:
    """`point.clients` clients sending requests of `point.images` images back to back for `seconds`."""
    return run_load(send, requests_for(count, point.images, IMAGES), judge, clients=point.clients, deadline_s=seconds)


def ceiling_closed(pool: CeilingPool, point: Point, seconds: float) -> tuple[LoadPoint, list[str]]:
    """The ceiling at `point`: its processes share the point's images in flight, each calling on its share."""
    return pool.run(max(point.images, point.in_flight // len(pool.workers)), seconds)
