"""The benchmarks' ratio intervals and verdicts (bench/intervals.py): verdicts written by hand from the rule, and the
interval checked against what any percentile bootstrap of a median must satisfy."""

from __future__ import annotations

import pytest

from bench.intervals import ratio_interval, verdict


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        pytest.param(0.98, 1.2, "met", id="all-above"),
        pytest.param(0.97, 1.0, "met", id="low-on-target"),
        pytest.param(0.8, 0.96, "missed", id="all-below"),
        pytest.param(0.9, 1.05, "inconclusive", id="straddles"),
        pytest.param(0.9, 0.97, "inconclusive", id="high-on-target"),
    ],
)
def test_verdict_needs_the_whole_interval_on_one_side(low: float, high: float, expected: str) -> None:
    assert verdict(low, high, 0.97) == expected


def test_rounds_that_agree_have_no_spread() -> None:
    assert ratio_interval([1.02, 1.02, 1.02], 0.97) == {
        "ratio": 1.02,
        "ci_low": 1.02,
        "ci_high": 1.02,
        "rounds": 3,
        "verdict": "met",
    }


def test_a_spread_of_rounds_widens_the_interval_around_their_median() -> None:
    rounds = [0.88, 0.95, 1.01, 1.04, 1.10]
    found = ratio_interval(rounds, 0.97)
    assert found["ratio"] == 1.01 and found["rounds"] == 5
    assert 0.88 <= found["ci_low"] < 1.01 < found["ci_high"] <= 1.10
    assert found["verdict"] == "inconclusive"
    assert ratio_interval(rounds, 0.97) == found  # Seeded: the same rounds give the same interval.


def test_one_round_judges_nothing() -> None:
    assert ratio_interval([1.5], 0.97) == {
        "ratio": 1.5,
        "ci_low": 1.5,
        "ci_high": 1.5,
        "rounds": 1,
        "verdict": "inconclusive",
    }


def test_every_round_below_target_is_missed() -> None:
    assert ratio_interval([0.70, 0.72, 0.71, 0.69], 0.97)["verdict"] == "missed"
