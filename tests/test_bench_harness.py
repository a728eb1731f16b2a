"""The judging parts of `make bench` and `make bench-tune`, on hand-written measurements."""

from __future__ import annotations

from typing import Any

import pytest

from bench.points import POINTS
from bench.run import summarize, summarize_open
from bench.search import pick


def row(
    units: int, batch: int, c1_p50: float, images_per_s: tuple[float, float, float], problems: list[str] | None = None
) -> dict[str, Any]:
    points = {
        p.name: {"p50_ms": c1_p50 if p is POINTS[0] else 99.0, "images_per_s": v}
        for p, v in zip(POINTS, images_per_s, strict=True)
    }
    geomean = (images_per_s[0] * images_per_s[1] * images_per_s[2]) ** (1 / 3)
    return {
        "setup": {"units": units, "max_batch": batch, "delay_ms": 2 if batch > 1 else 0},
        "points": points,
        "geomean_images_per_s": geomean,
        "problems": problems or [],
    }


@pytest.mark.parametrize(
    ("rows", "winner"),
    [
        ([row(1, 1, 10, (100, 200, 300)), row(2, 8, 14, (100, 400, 600))], 1),
        ([row(1, 1, 10, (100, 200, 300)), row(2, 8, 16, (100, 400, 600))], 0),
        (
            [
                row(1, 1, 10, (100, 200, 300)),
                row(2, 8, 12, (100, 400, 600), ["image 3: combined label 'a', expected 'b'"]),
            ],
            0,
        ),
        ([row(1, 1, 10, (100, 200, 300)), row(2, 1, 10, (100, 200, 300))], 0),
    ],
    ids=[
        "faster-and-within-the-latency-bound",
        "faster-but-a-lone-client-waits-1.6x",
        "wrong-answers-disqualify",
        "tie-fewer-units",
    ],
)
def test_one_rule_picks_every_contenders_setup(rows: list[dict[str, Any]], winner: int) -> None:
    assert pick(rows) is rows[winner]


def test_no_setup_qualifies_when_all_answer_wrong() -> None:
    assert pick([row(1, 1, 10, (1, 1, 1), ["2 errors"])]) is None


def measured(images_per_s: list[float], errors: int = 0, mismatches: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "images_per_s": v,
            "p50_ms": 10.0,
            "p90_ms": 12.0,
            "p99_ms": 15.0,
            "latency_samples": 100,
            "errors": errors,
            "mismatches": mismatches,
            "problems": [],
            "client_cpu_s": 0.5,
            "wall_s": 5.0,
        }
        for v in images_per_s
    ]


def test_ratios_are_ours_over_each_peer_per_round_and_a_wrong_answer_voids_the_point() -> None:
    rows = summarize(
        "ours",
        {
            "ours": measured([110, 120, 130]),
            "flask": measured([100, 100, 100]),
            "ray": measured([100, 100, 100], mismatches=1),
            "ceiling": measured([125, 125, 125]),
        },
    )
    assert rows["flask"]["ours_over_this"]["per_round"] == [1.1, 1.2, 1.3]
    assert rows["flask"]["ours_over_this"]["ratio"] == 1.2 and rows["flask"]["ours_over_this"]["verdict"] == "met"
    assert rows["ray"]["ours_over_this"]["verdict"] == "invalid" and rows["ray"]["valid"] is False
    assert rows["ceiling"]["is_ceiling"] is True
    assert rows["ours"]["client_cpu_share"] == 0.05


def test_a_ceiling_that_a_server_beat_is_not_called_one() -> None:
    rows = summarize("ours", {"ours": measured([130, 130, 130]), "ceiling": measured([125, 125, 125])})
    assert rows["ceiling"]["is_ceiling"] is False


def test_throughput_at_the_objective_is_the_best_rate_that_kept_p99_within_it() -> None:
    def rate(images_per_s: float, p99: float, errors: int = 0) -> dict[str, Any]:
        return {"images_per_s": images_per_s, "p99_ms": p99, "errors": errors, "mismatches": 0}

    found = summarize_open(
        "ours",
        {
            "ours": [rate(10, 20), rate(50, 40), rate(80, 60)],
            "flask": [rate(10, 30), rate(40, 45, errors=1), rate(25, 48)],
            "ray": [rate(10, 70)],
        },
        objective_ms=50,
    )
    assert found["ours"]["throughput_at_objective"] == 50
    assert found["flask"]["throughput_at_objective"] == 25 and found["flask"]["ours_over_this_at_objective"] == 2.0
    assert found["ray"]["throughput_at_objective"] == 0.0 and found["ray"]["ours_over_this_at_objective"] is None
