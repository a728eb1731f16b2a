"""Bounded load generators: closed loop (a fixed number of clients, each sending its next request when its last
is answered) and open loop (Poisson arrivals at a fixed offered rate), each with a deadline.

Each request is a list of image indices; `send` answers per image, and every answer is judged: against the
workload's expected member labels, or by a `Judge` (the answers gate of bench/reference.py). Each point
records the load generator's own CPU time: on a 2-core machine the clients share the server's cores.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

Labels = list[dict[str, str]]
Send = Callable[[list[int]], Any]
Judge = Callable[[list[int], Any], int]
"""How many of a request's answers are wrong (a count, so that a missing answer counts too)."""


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
    p90_ms: float = float("nan")
    latency_samples: int = 0
    client_cpu_s: float = 0.0
    wall_s: float = 0.0
    first_error: str = ""

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def p50_p99_ms(latencies_s: Sequence[float]) -> tuple[float, float]:
    """Median and 99th-percentile latency in milliseconds (NaN when nothing completed)."""
    p50, _, p99 = percentiles_ms(latencies_s)
    return p50, p99


def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    """p50, p90 and p99 in milliseconds, nearest rank (NaN when nothing completed). Below 100 samples p99 is the
    maximum: the sample count is recorded beside it."""
    ordered = sorted(latencies_s)
    if not ordered:
        return float("nan"), float("nan"), float("nan")
    # tuple() of a generator is tuple[float, ...] to mypy; three quantiles give three.
    return tuple(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))] for q in (0.5, 0.9, 0.99))  # type: ignore[return-value]


def labels_judge(expected: Sequence[dict[str, str]]) -> Judge:
    """Mismatches of per-image member labels against `expected`, plus any image answered twice or not at all."""
    return lambda indices, labels: (
        sum(got != expected[i] for got, i in zip(labels, indices, strict=False)) + abs(len(labels) - len(indices))
    )


def requests_for(count: int, images_per_request: int, total_images: int) -> list[list[int]]:
    """`count` requests of consecutive image indices, wrapping around the workload's images."""
    return [[(r * images_per_request + i) % total_images for i in range(images_per_request)] for r in range(count)]


def run_load(
    send: Send,
    requests: Sequence[list[int]],
    expected: Sequence[dict[str, str]] | Judge,
    *,
    clients: int,
    deadline_s: float,
) -> LoadPoint:
    """Send the requests in order from `clients` threads, each taking the next one when its last is answered, until
    they run out or the deadline passes (none started after it); time and check each.

    The clients pull from one shared list rather than queueing every request up front: a long list (a round is
    bounded by time, not count) then costs nothing, and the wall time ends with the last answer.
    """
    judge = expected if callable(expected) else labels_judge(expected)
    latencies: list[float] = []
    errors = mismatches = images = 0
    failures: list[str] = []
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
            except Exception as e:  # Any failure of a contender counts as an error, the run goes on.
                with lock:
                    errors += 1
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - begin
            wrong = judge(indices, labels)
            with lock:
                latencies.append(elapsed)
                images += len(indices)
                mismatches += wrong

    begin, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        for running in [pool.submit(client) for _ in range(clients)]:
            running.result()
    wall = time.perf_counter() - begin
    return _point(latencies, images, wall, errors, mismatches, time.process_time() - cpu, failures)


def _point(
    latencies: Sequence[float],
    images: int,
    wall: float,
    errors: int,
    mismatches: int,
    cpu_s: float,
    failures: Sequence[str],
) -> LoadPoint:
    p50, p90, p99 = percentiles_ms(latencies)
    return LoadPoint(
        images_per_s=images / wall,
        requests_per_s=len(latencies) / wall,
        p50_ms=p50,
        p99_ms=p99,
        errors=errors,
        mismatches=mismatches,
        requests=len(latencies) + errors,
        p90_ms=p90,
        latency_samples=len(latencies),
        client_cpu_s=round(cpu_s, 3),
        wall_s=round(wall, 3),
        first_error=failures[0][:300] if failures else "",
    )


def open_loop(
    send: Send,
    requests: Sequence[list[int]],
    judge: Judge,
    *,
    rate_per_s: float,
    seconds: float,
    seed: int = 0,
    connections: int = 64,
    drain_s: float = 30.0,
) -> LoadPoint:
    """Requests arriving as a Poisson process at `rate_per_s` for `seconds`, whatever the server's pace.

    Arrival times are drawn before the first is sent, and each latency runs from its request's scheduled
    arrival, not from when a connection was free to send it: a server that falls behind is charged for the
    whole wait (no coordinated omission). Up to `connections` requests are in flight at once; the rest wait
    in line, their clocks running. After the last arrival the answers have `drain_s` to come back; any later
    is an error. Throughput is the images answered over the time until the last answer.
    """
    rng = random.Random(seed)
    arrivals, at = [], rng.expovariate(rate_per_s)
    while at < seconds:
        arrivals.append(at)
        at += rng.expovariate(rate_per_s)
    latencies: list[float] = []
    errors = mismatches = images = 0
    failures: list[str] = []
    lock = threading.Lock()
    last_answer = 0.0
    closed = False  # Set when the drain time is up: an answer after it was already counted as an error.

    def one(indices: list[int], due: float) -> None:
        nonlocal errors, mismatches, images, last_answer
        try:
            answers = send(indices)
        except Exception as e:  # Any failure of a contender counts as an error, the run goes on.
            with lock:
                errors += 0 if closed else 1
                failures.append(f"{type(e).__name__}: {e}")
            return
        done = time.perf_counter()
        wrong = judge(indices, answers)
        with lock:
            if closed:
                return
            latencies.append(done - due)
            images += len(indices)
            mismatches += wrong
            last_answer = max(last_answer, done)

    begin, cpu = time.perf_counter(), time.process_time()
    pool = ThreadPoolExecutor(connections, thread_name_prefix="open-loop")
    futures = []
    for n, offset in enumerate(arrivals):
        due = begin + offset
        if (pause := due - time.perf_counter()) > 0:
            time.sleep(pause)
        futures.append(pool.submit(one, requests[n % len(requests)], due))
    _, late = wait(futures, timeout=seconds + drain_s - (time.perf_counter() - begin))
    with lock:
        closed = True
        errors += len(late)
        failures.extend(["no answer within the drain time"] * bool(late))
    pool.shutdown(wait=False, cancel_futures=True)  # Calls still running end within the senders' own timeout.
    wall = max(last_answer - begin, seconds)
    return _point(latencies, images, wall, errors, mismatches, time.process_time() - cpu, failures)


def alternating_rounds(
    senders: Mapping[str, Send],
    expected: Mapping[str, Sequence[dict[str, str]] | Judge],
    plan: Sequence[list[int]],
    *,
    clients: int,
    rounds: int,
    seconds: float,
    load: str,
) -> dict[str, list[dict[str, float | int]]]:
    """Each sender's load points over `rounds` of `seconds`, the order rotated by one every round, so that over as
    many rounds as senders each takes every position once; each point is printed as it is measured.

    Position matters: three archives of `multishape`, two of them identical, served in reversed order every other
    round put whichever stood first and last 4% behind the others; placed in the middle, the same one was level.
    """
    points: dict[str, list[dict[str, float | int]]] = {name: [] for name in senders}
    names = list(senders)
    for r in range(rounds):
        for name in rotated(names, r):
            point = run_load(senders[name], plan, expected[name], clients=clients, deadline_s=seconds)
            points[name].append(point.to_json())
            print(
                f"{load} round {r + 1} {name}: {point.images_per_s:.1f} images/s, p50 {point.p50_ms:.1f} ms, "
                f"errors {point.errors}, mismatches {point.mismatches}"
            )
    return points


def rotated(names: Sequence[str], by: int) -> list[str]:
    """`names` rotated left by `by`: over as many rounds as names, each takes every position once."""
    shift = by % len(names)
    return [*names[shift:], *names[:shift]]


def medians(
    points: Mapping[str, Mapping[str, Sequence[Mapping[str, float | int]]]], key: str
) -> dict[str, dict[str, float]]:
    """The median of `key` over each (load, variant)'s rounds."""
    return {
        load: {name: statistics.median(p[key] for p in pts) for name, pts in by.items()} for load, by in points.items()
    }
