"""A bounded load generator: a fixed list of requests, a fixed number of clients, a deadline.

Each request is a list of image indices; `send` answers with each member's label per image, and
every answer is compared with the workload's expected labels.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

Labels = list[dict[str, str]]
Send = Callable[[list[int]], Labels]


@dataclass(frozen=True)
class LoadPoint:
    """What one load point measured."""

    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mismatches: int
    requests: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def p50_p99_ms(latencies_s: Sequence[float]) -> tuple[float, float]:
    """Median and 99th-percentile latency in milliseconds (NaN when nothing completed)."""
    ordered = sorted(latencies_s)
    if not ordered:
        return float("nan"), float("nan")
    return 1000 * ordered[len(ordered) // 2], 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def requests_for(count: int, images_per_request: int, total_images: int) -> list[list[int]]:
    """`count` requests of consecutive image indices, wrapping around the workload's images."""
    return [
        [(r * images_per_request + i) % total_images for i in range(images_per_request)] for r in range(count)
    ]


def run_load(
    send: Send, requests: Sequence[list[int]], expected: Sequence[dict[str, str]], *, clients: int, deadline_s: float
) -> LoadPoint:
    """Send every request from `clients` threads (none started after the deadline); time and check each."""
    latencies: list[float] = []
    errors = mismatches = images = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def one(indices: list[int]) -> None:
        nonlocal errors, mismatches, images
        if time.monotonic() > stop_at:
            return
        begin = time.perf_counter()
        try:
            labels = send(indices)
        except Exception:  # Any failure of a contender counts as an error, the run goes on.
            with lock:
                errors += 1
            return
        elapsed = time.perf_counter() - begin
        with lock:
            latencies.append(elapsed)
            images += len(indices)
            mismatches += sum(got != expected[i] for got, i in zip(labels, indices, strict=False)) + abs(len(labels) - len(indices))

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - begin
    done = len(latencies)
    p50, p99 = p50_p99_ms(latencies)
    return LoadPoint(
        images_per_s=images / wall,
        requests_per_s=done / wall,
        p50_ms=p50,
        p99_ms=p99,
        errors=errors,
        mismatches=mismatches,
        requests=done + errors,
    )
