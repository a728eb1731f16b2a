"""Timing candidate plans as a worker will call them: at its slice sizes, with its member threads calling at once.

A served batch is cut into one slice per member thread, so every thread calls a member at the same time; a plan
timed alone on one thread can look fast and then queue its callers (an engine with one stream) once served.
Each round starts `concurrency` calls together and takes the wall time of the round as the ms per call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

TIMED_CALLS = 5
TIME_BUDGET_S = 1.0
Forward = Callable[[torch.Tensor], torch.Tensor]


def time_plans(
    forwards: dict[str, Forward], probes: dict[int, torch.Tensor], device: torch.device, concurrency: int = 1
) -> dict[str, dict[int, float]]:
    """Best-of-n ms per call for every plan at every size, with `concurrency` threads calling it at once (each round's
    wall time), plans interleaved so that noise hits them alike.

    Stops early (after at least two rounds each) once TIME_BUDGET_S per size is spent.
    """
    best: dict[str, dict[int, float]] = {plan: {} for plan in forwards}
    pool = ThreadPoolExecutor(concurrency - 1, thread_name_prefix="plan-timing") if concurrency > 1 else None
    try:
        for size, probe in probes.items():
            spent = 0.0
            for round_number in range(TIMED_CALLS):
                for plan, forward in forwards.items():
                    elapsed = _timed_round(forward, probe, device, pool, concurrency)
                    spent += elapsed
                    best[plan][size] = min(best[plan].get(size, math.inf), 1000 * elapsed)
                if round_number >= 1 and spent > TIME_BUDGET_S:
                    break
    finally:
        if pool is not None:
            pool.shutdown()
    return best


def _timed_round(forward: Forward, probe: torch.Tensor, device: torch.device, pool: ThreadPoolExecutor | None, concurrency: int) -> float:
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
