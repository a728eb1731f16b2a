"""The one way the scripts, benchmarks and tests wait: poll a check until it holds, with a bound, never a guessed
sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout_s: float, *, every_s: float = 0.25) -> T:
    """Call `check` every `every_s` until it returns something truthy, and return that.

    Raises TimeoutError naming `what` once `timeout_s` have passed (the check runs one last time at the
    deadline, so a slow check still gets its full window). A check raises to stop the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if value := check():
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not seen within {timeout_s:g} s")
        time.sleep(every_s)
