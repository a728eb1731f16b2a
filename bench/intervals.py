"""A ratio between two servers measured in alternating rounds, with its 95% bootstrap interval and a verdict.

The ratio is the median of the per-round ratios (each round runs both servers back to back, so drift of the
machine cancels within a round). The interval is SciPy's percentile bootstrap of that median; with the few
rounds a benchmark can afford it is wide, and the verdict says so rather than reading a winner into noise:
`met` only when the whole interval clears the target, `missed` when all of it is below, else `inconclusive`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999


def ratio_interval(ratios: Sequence[float], target: float, seed: int = 0) -> dict[str, Any]:
    """The median per-round ratio, its 95% bootstrap interval, and the verdict against `target`."""
    median = statistics.median(ratios)
    if len(set(ratios)) < 2:  # One round, or rounds that agree exactly: no spread to resample.
        low = high = median
    else:
        result = stats.bootstrap(
            (numpy.asarray(ratios, dtype=float),),
            numpy.median,
            confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES,
            method="percentile",
            random_state=numpy.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {
        "ratio": round(median, 3),
        "ci_low": round(low, 3),
        "ci_high": round(high, 3),
        "rounds": len(ratios),
        "verdict": verdict(low, high, target) if len(ratios) > 1 else "inconclusive",  # One round has no interval.
    }


def verdict(low: float, high: float, target: float) -> str:
    """`met` when the interval clears `target`, `missed` when it lies wholly below, `inconclusive` otherwise."""
    if low >= target:
        return "met"
    if high < target:
        return "missed"
    return "inconclusive"
