"""The benchmarks' load generator (bench/loadgen.py), driven by an in-process stand-in for a server."""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.loadgen import alternating_rounds, labels_judge, open_loop, requests_for, run_load

EXPECTED = [{"m": "yes"}, {"m": "no"}, {"m": "yes"}, {"m": "no"}, {"m": "yes"}, {"m": "no"}]


def answer(indices: list[int]) -> list[dict[str, str]]:
    """Right for every image but image 3; image 5 fails the request."""
    if 5 in indices:
        raise ConnectionError("refused")
    return [{"m": "wrong"} if i == 3 else EXPECTED[i] for i in indices]


def test_every_request_is_sent_and_checked() -> None:
    point = run_load(answer, requests_for(6, 1, 6), EXPECTED, clients=2, deadline_s=30)
    assert (point.requests, point.errors, point.mismatches) == (6, 1, 1)


def test_a_round_is_bounded_by_its_deadline_not_by_its_list() -> None:
    """A list far longer than the deadline allows costs nothing: the round ends with the last answer after it."""

    def slow(indices: list[int]) -> list[dict[str, str]]:
        time.sleep(0.01)
        return [EXPECTED[i] for i in indices]

    began = time.perf_counter()
    point = run_load(slow, requests_for(100_000, 2, 6), EXPECTED, clients=2, deadline_s=0.2)
    assert time.perf_counter() - began < 1.0
    assert 2 <= point.requests <= 2 * (0.2 / 0.01 + 1)
    assert (point.errors, point.mismatches) == (0, 0)


def test_alternating_rounds_put_every_sender_in_every_position() -> None:
    calls: list[str] = []

    def sender(name: str) -> Any:
        def send(indices: list[int]) -> list[dict[str, str]]:
            calls.append(name)
            return [EXPECTED[i] for i in indices]

        return send

    names = ["a", "b", "c", "d"]
    points = alternating_rounds(
        {name: sender(name) for name in names},
        {name: EXPECTED for name in names},
        requests_for(1, 1, 6),
        clients=1,
        rounds=4,
        seconds=5,
        load="test",
    )
    assert calls == ["a", "b", "c", "d", "b", "c", "d", "a", "c", "d", "a", "b", "d", "a", "b", "c"]
    assert [len(points[name]) for name in names] == [4, 4, 4, 4]


def one_at_a_time(service_s: float) -> Any:
    """A stand-in server that answers one request at a time, each taking `service_s`."""
    busy = threading.Lock()

    def send(indices: list[int]) -> list[dict[str, str]]:
        with busy:
            time.sleep(service_s)
        return [EXPECTED[i] for i in indices]

    return send


def test_open_loop_charges_a_server_that_falls_behind_for_the_whole_wait() -> None:
    """100 arrivals/s for 0.5 s at a server of 50/s: about 50 arrive, the last ones after a backlog of about
    0.5 s. Timed from the scheduled arrival, p99 shows that wait; a closed-loop client would see 20 ms."""
    point = open_loop(
        one_at_a_time(0.02), requests_for(6, 1, 6), labels_judge(EXPECTED), rate_per_s=100, seconds=0.5, seed=3
    )
    assert 30 <= point.requests <= 80 and (point.errors, point.mismatches) == (0, 0)
    assert point.p99_ms > 250
    assert point.images_per_s < 55


def test_open_loop_below_capacity_waits_little() -> None:
    point = open_loop(
        one_at_a_time(0.005), requests_for(6, 1, 6), labels_judge(EXPECTED), rate_per_s=20, seconds=0.5, seed=3
    )
    assert point.requests >= 3 and (point.errors, point.mismatches) == (0, 0)
    assert point.p50_ms < 50


def test_open_loop_counts_answers_after_the_drain_as_errors() -> None:
    point = open_loop(
        one_at_a_time(0.3),
        requests_for(6, 1, 6),
        labels_judge(EXPECTED),
        rate_per_s=40,
        seconds=0.2,
        seed=1,
        drain_s=0.1,
    )
    assert point.errors >= 1 and point.errors + point.latency_samples == point.requests
