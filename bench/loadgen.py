"""A bounded load generator: a fixed list of requests, a fixed number of clients, a deadline.

Each request is a list of image indices; `send` answers with each member's label per image, and
every answer is compared with the workload's expected labels.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    """Send the requests in order from `clients` threads, each taking the next one when its last is answered, until
    they run out or the deadline passes (none started after it); time and check each.

    The clients pull from one shared list rather than queueing every request up front: a long list (a round is
    bounded by time, not count) then costs nothing, and the wall time ends with the last answer.
    """
    latencies: list[float] = []
    errors = mismatches = images = 0
    lock = threading.Lock()
    pending = iter(requests)
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        nonlocal errors, mismatches, images
        while True:
            with lock:
                indices = next(pending, None)
            if indices is None or time.monotonic() > stop_at:
                return
            begin = time.perf_counter()
            try:
                labels = send(indices)
            except Exception:  # Any failure of a contender counts as an error, the run goes on.
                with lock:
                    errors += 1
                continue
            elapsed = time.perf_counter() - begin
            with lock:
                latencies.append(elapsed)
                images += len(indices)
                mismatches += sum(got != expected[i] for got, i in zip(labels, indices, strict=False)) + abs(len(labels) - len(indices))

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for running in [pool.submit(client) for _ in range(clients)]:
            running.result()
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


def alternating_rounds(
    senders: Mapping[str, Send], expected: Mapping[str, Sequence[dict[str, str]]], plan: Sequence[list[int]], *,
    clients: int, rounds: int, seconds: float, load: str,
) -> dict[str, list[dict[str, float | int]]]:  # fmt: skip
    """Each sender's load points over `rounds` of `seconds`, the order rotated by one every round, so that over as
    many rounds as senders each takes every position once; each point is printed as it is measured.

    Position matters: three archives of `multishape`, two of them identical, served in reversed order every other
    round put whichever stood first and last 4% behind the others; placed in the middle, the same one was level.
    """
    points: dict[str, list[dict[str, float | int]]] = {name: [] for name in senders}
    names = list(senders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            point = run_load(senders[name], plan, expected[name], clients=clients, deadline_s=seconds)
            points[name].append(point.to_json())
            print(f"{load} round {r + 1} {name}: {point.images_per_s:.1f} images/s, p50 {point.p50_ms:.1f} ms, "
                  f"errors {point.errors}, mismatches {point.mismatches}")  # fmt: skip
    return points


def medians(points: Mapping[str, Mapping[str, Sequence[Mapping[str, float | int]]]], key: str) -> dict[str, dict[str, float]]:
    """The median of `key` over each (load, variant)'s rounds."""
    return {load: {name: statistics.median(p[key] for p in pts) for name, pts in by.items()} for load, by in points.items()}
