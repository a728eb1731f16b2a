"""The benchmarks' load generator (bench/loadgen.py), driven by an in-process stand-in for a server."""

from __future__ import annotations

import time

from bench.loadgen import requests_for, run_load

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
