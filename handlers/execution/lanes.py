"""Member lanes: each member group's own thread, so that a request with a deadline never waits on a straggler.

Under a deadline every member group runs on its lane, a thread of its own, and the batch waits for the lanes
only until its deadline. A call that overruns keeps its lane until it returns, so a slow or hung member holds
one thread, never more: at most one call per lane runs, and a call is queued behind it only for a required
member (and cancelled at the deadline if it has not started). A lane whose call has run for `stuck_after_s`
is stuck: the worker says so, and the handler has TorchServe replace the worker (docs: Deadlines and quorum).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from handlers.config.specs import EnsembleSpec
from handlers.execution.groups import Group
from handlers.execution.missing import BUSY, DEADLINE, error_reason, mark

T = TypeVar("T")
# One group's work in a batch: the group, the inputs it runs on (None: all) and those inputs' rows.
Job = tuple[Group, torch.Tensor | None, torch.Tensor]
Slice = tuple[torch.Tensor, float]


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one lane call gave: its value or the exception it raised, and when it finished (`time.monotonic`)."""

    value: T | None
    error: Exception | None
    finished: float


class Lane:
    """One member group's thread: calls run one at a time, and the lane knows since when the running one has run."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"lane-{name}")
        self._lock = threading.Lock()
        self._calls: list[Future[Outcome[object]]] = []
        self._running_since: float | None = None

    def busy(self) -> bool:
        """A call is still running or queued on this lane."""
        with self._lock:
            self._calls = [call for call in self._calls if not call.done()]
            return bool(self._calls)

    def running_for(self, now: float) -> float:
        """Seconds the running call has run (0 when none runs)."""
        since = self._running_since
        return 0.0 if since is None else now - since

    def submit(self, work: Callable[[], T]) -> Future[Outcome[T]]:
        """Run `work` on the lane after the calls before it; its exception is caught into the outcome."""

        def call() -> Outcome[T]:
            self._running_since = time.monotonic()
            try:
                return Outcome(work(), None, time.monotonic())
            except Exception as e:  # A member's failure is its outcome; the lane goes on.
                return Outcome(None, e, time.monotonic())
            finally:
                self._running_since = None

        future = self._executor.submit(call)
        with self._lock:
            self._calls.append(future)  # type: ignore[arg-type]
        return future

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call runs or is queued, for at most `timeout` seconds (None: as long as it takes)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [call for call in self._calls if not call.done()]
            if not pending:
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                pending[-1].exception(timeout=left)
            except CancelledError:
                continue
            except TimeoutError:
                return False


class Lanes:
    """The lanes of one ensemble's member groups, made as groups first run under a deadline."""

    def __init__(self, spec: EnsembleSpec) -> None:
        self.spec = spec
        self._lanes: dict[tuple[int, ...], Lane] = {}

    def stuck(self) -> list[str]:
        """The members whose lane call has run longer than the ensemble's `stuck_after_s`."""
        now = time.monotonic()
        return [
            self.spec.members[m].name
            for indices, lane in self._lanes.items()
            if lane.running_for(now) > self.spec.stuck_after_s
            for m in indices
        ]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no lane has a call running or queued, for at most `timeout` seconds in all."""
        end = time.monotonic() + timeout
        return all(lane.wait_idle(max(0.0, end - time.monotonic())) for lane in list(self._lanes.values()))

    def wait_for(self, jobs: Sequence[Job], missing: list[dict[int, str]]) -> list[Job]:
        """The jobs to run without a deadline: a group still running an earlier batch's call is waited for until it
        counts as stuck, then it is `busy` for this batch. At most one call per member runs at a time."""
        ready = []
        for job in jobs:
            lane = self._lanes.get(job[0].indices)
            if lane is not None and lane.busy():
                left = self.spec.stuck_after_s - lane.running_for(time.monotonic())
                if not lane.wait_idle(max(0.0, left)):
                    mark(missing, job[0].indices, job[1], BUSY)
                    continue
            ready.append(job)
        return ready

    def run(
        self,
        jobs: Sequence[Job],
        attempt: Callable[[Job], list[tuple[Job, list[Slice] | Exception]]],
        store: Callable[[Job, Sequence[Slice], torch.Tensor | None], None],
        missing: list[dict[int, str]],
        due: Sequence[float | None],
    ) -> bool:
        """Each job on its group's lane (`attempt` runs it there: the slices of the job, or of its parts, or why they
        failed), waited for until the last of the inputs' deadlines (`due`, `time.monotonic()` seconds; without limit
        when an input has none); `store` takes a job's slices and the rows that missed their deadline (they count for
        the others). False when a job had not finished.

        A soft group still busy with an earlier call is `busy` at once; a required one queues behind that call, and is
        `busy` if it has not started by the deadline.
        """
        end = None if any(when is None for when in due) else max(when for when in due if when is not None)
        submitted: list[tuple[Job, Future[Outcome[list[tuple[Job, list[Slice] | Exception]]]]]] = []
        for job in jobs:
            group, rows, _ = job
            lane = self._lane(group)
            if lane.busy() and not any(self.spec.members[m].required for m in group.indices):
                mark(missing, group.indices, rows, BUSY)
                continue
            submitted.append((job, lane.submit(functools.partial(attempt, job))))
        wait([future for _, future in submitted], timeout=None if end is None else max(0.0, end - time.monotonic()))
        finished = True
        for job, future in submitted:
            group, rows, _ = job
            if not future.done():
                mark(missing, group.indices, rows, BUSY if future.cancel() else DEADLINE)
                finished = False
                continue
            outcome = future.result()
            if outcome.error is not None or outcome.value is None:
                mark(missing, group.indices, rows, error_reason(outcome.error or RuntimeError("no result")))
                continue
            for part, result in outcome.value:
                if isinstance(result, Exception):
                    mark(missing, group.indices, part[1], error_reason(result))
                    continue
                everyone = range(len(due)) if part[1] is None else part[1].tolist()
                late = [row for row in everyone if (when := due[row]) is not None and outcome.finished > when]
                late_rows = torch.tensor(late, dtype=torch.long) if late else None
                store(part, result, late_rows)
                if late_rows is not None:
                    mark(missing, group.indices, late_rows, DEADLINE)
        return finished

    def _lane(self, group: Group) -> Lane:
        lane = self._lanes.get(group.indices)
        if lane is None:
            lane = self._lanes[group.indices] = Lane("+".join(self.spec.members[m].name for m in group.indices))
        return lane
