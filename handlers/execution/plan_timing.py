"""Timing candidate plans as a worker will call them: at its slice sizes, with its member threads calling at once.

A served batch is cut into one slice per member thread, so every thread calls a member at the same time; a plan
timed alone on one thread can look fast and then queue its callers (an engine with one stream) once served.
Each round starts `concurrency` calls together and takes the wall time of the round as the ms per call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

TIMED_CALLS = 5
TIME_BUDGET_S = 1.0
Forward = Callable[[torch.Tensor], torch.Tensor]


def time_plans(
    forwards: dict[str, Forward], probes: dict[int, torch.Tensor], device: torch.device, concurrency: int = 1
) -> dict[str, dict[int, float]]:
    """Best-of-n ms per call for every plan at every size, with `concurrency` threads calling it at once (each round's
    wall time); see `best_of_rounds`."""
    pool = ThreadPoolExecutor(concurrency - 1, thread_name_prefix="plan-timing") if concurrency > 1 else None
    try:
        return best_of_rounds(
            list(forwards),
            list(probes),
            lambda plan, size: _timed_round(forwards[plan], probes[size], device, pool, concurrency),
        )
    finally:
        if pool is not None:
            pool.shutdown()


def best_of_rounds(
    names: Sequence[str],
    sizes: Sequence[int],
    timed: Callable[[str, int], float],
    *,
    rounds: int = TIMED_CALLS,
    budget_s: float = TIME_BUDGET_S,
) -> dict[str, dict[int, float]]:
    """Best-of-rounds ms for every name at every size, where `timed(name, size)` returns one run's seconds.

    The names are interleaved, their order reversed every other round, so that noise and drift hit them alike;
    after two rounds a size stops once `budget_s` is spent on it.
    """
    best: dict[str, dict[int, float]] = {name: {} for name in names}
    for size in sizes:
        spent = 0.0
        for round_number in range(rounds):
            for name in names if round_number % 2 == 0 else list(reversed(names)):
                elapsed = timed(name, size)
                spent += elapsed
                best[name][size] = min(best[name].get(size, math.inf), 1000 * elapsed)
            if round_number >= 1 and spent > budget_s:
                break
    return best


def _timed_round(
    forward: Forward, probe: torch.Tensor, device: torch.device, pool: ThreadPoolExecutor | None, concurrency: int
) -> float:
    """Seconds for `concurrency` calls of `forward` started together: the calling thread's and the pool's."""
    if pool is None:
        return _timed_call(forward, probe, device)
    start = threading.Barrier(concurrency)
    began = time.perf_counter()
    others = [pool.submit(_call_after, start, forward, probe.clone()) for _ in range(concurrency - 1)]
    _call_after(start, forward, probe)
    for other in others:
        other.result()
    return time.perf_counter() - began


def _call_after(start: threading.Barrier, forward: Forward, probe: torch.Tensor) -> None:
    start.wait()
    with torch.inference_mode():
        forward(probe)


def _timed_call(forward: Forward, probe: torch.Tensor, device: torch.device) -> float:
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        forward(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began
