"""The member threads of a worker: tasks spread over them, the calling thread working too."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MemberThreads:
    """`parallelism` threads in all: the caller's and parallelism - 1 helpers."""

    def __init__(self, parallelism: int) -> None:
        self.parallelism = parallelism
        self._pool = ThreadPoolExecutor(parallelism - 1, thread_name_prefix="member") if parallelism > 1 else None

    def map(self, work: Callable[[T], R], items: Sequence[T], *, capture: bool = False) -> list[Any]:
        """`work` on every item, in order, on the member threads; the calling thread works too.

        Helpers join only when there is more than one item, so a lone task never pays a hand-off.
        The first item (by position) that raised re-raises here, as a loop would have; with `capture`, an item
        that raised has its exception as its result instead.
        """
        results: list[Any] = [None] * len(items)
        failures: dict[int, BaseException] = {}
        pending = iter(range(len(items)))
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    results[index] = work(items[index])
                except Exception as e:  # Re-raised below in item order, on the calling thread.
                    failures[index] = e

        helpers = min(self.parallelism - 1, len(items) - 1)
        joined = [self._pool.submit(drain) for _ in range(helpers)] if self._pool else []
        drain()
        for helper in joined:
            helper.result()
        if failures and not capture:
            raise failures[min(failures)]
        for index, failure in failures.items():
            results[index] = failure
        return results
