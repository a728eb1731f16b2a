"""Member lanes: each member group's own thread, so that a request with a deadline never waits on a straggler.

Under a deadline every member group runs on its lane, a thread of its own, and the batch waits for the lanes
only until its deadline. A call that overruns keeps its lane until it returns, so a slow or hung member holds
one thread, never more: at most one call per lane runs, and a call is queued behind it only for a required
member (and cancelled at the deadline if it has not started). A lane whose call has run for `stuck_after_s`
is stuck: it is left to its call, the group gets a new lane, and the handler has TorchServe replace the worker
once it is idle (`handlers.worker_exit`; docs: Deadlines and quorum).
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
# Stuck lanes a group may leave behind (each holds a thread) before it stays busy until the worker is replaced.
MAX_ABANDONED = 2
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
        self._abandoned: dict[tuple[int, ...], list[Lane]] = {}

    def stuck(self) -> list[str]:
        """The members whose lane call has run longer than the ensemble's `stuck_after_s`.

        A stuck lane is abandoned to its call (a thread cannot be stopped) and the group gets a new lane at its next
        call, so the member answers again; after MAX_ABANDONED stuck lanes it keeps the last one, and stays busy until
        the worker is replaced (`handlers.worker_exit`).
        """
        now = time.monotonic()
        stuck = []
        for indices, lane in list(self._lanes.items()):
            if lane.running_for(now) > self.spec.stuck_after_s:
                stuck += [self.spec.members[m].name for m in indices]
                abandoned = self._abandoned.setdefault(indices, [])
                if lane not in abandoned and len(abandoned) < MAX_ABANDONED:
                    abandoned.append(lane)
                    del self._lanes[indices]
        return stuck

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

    def calls(
        self,
        attempt: Callable[[Job], list[tuple[Job, list[Slice] | Exception]]],
        store: Callable[[Job, Sequence[Slice], torch.Tensor | None], None],
        missing: list[dict[int, str]],
        due: Sequence[float | None],
    ) -> LaneCalls:
        """One batch's calls on these lanes (LaneCalls says how they run and count)."""
        return LaneCalls(self, attempt, store, missing, due)

    def lane(self, group: Group) -> Lane:
        """The group's lane, made at its first call."""
        lane = self._lanes.get(group.indices)
        if lane is None:
            lane = self._lanes[group.indices] = Lane("+".join(self.spec.members[m].name for m in group.indices))
        return lane


# A submitted job, its call, and whether it was queued behind an earlier batch's call still running.
Pending = tuple[Job, "Future[Outcome[list[tuple[Job, list[Slice] | Exception]]]]", bool]


class LaneCalls:
    """One batch's jobs on their groups' lanes, waited for until the inputs' deadlines.

    `attempt` runs a job on its lane (the slices of the job, or of its parts, or why they failed); `store` takes a
    job's slices and the rows that missed their deadline (`due[row]`, `time.monotonic()` seconds or None; the slices
    count for the other rows). A soft group still busy with an earlier call is `busy` at once; a required one queues
    behind that call, and is `busy` if it has not started when the waiting ends.
    """

    def __init__(
        self,
        lanes: Lanes,
        attempt: Callable[[Job], list[tuple[Job, list[Slice] | Exception]]],
        store: Callable[[Job, Sequence[Slice], torch.Tensor | None], None],
        missing: list[dict[int, str]],
        due: Sequence[float | None],
    ) -> None:
        self._lanes, self._attempt, self._store, self._missing, self._due = lanes, attempt, store, missing, due
        # The last deadline; None (wait for everything) when an input has none.
        self.end = None if any(when is None for when in due) else max(when for when in due if when is not None)
        self._pending: list[Pending] = []

    def submit(self, jobs: Sequence[Job]) -> None:
        """Start each job on its group's lane (or mark it busy)."""
        for job in jobs:
            group, rows, _ = job
            lane = self._lanes.lane(group)
            busy = lane.busy()
            if busy and not any(self._lanes.spec.members[m].required for m in group.indices):
                mark(self._missing, group.indices, rows, BUSY)
                continue
            self._pending.append((job, lane.submit(functools.partial(self._attempt, job)), busy))

    def wait(self, until: float | None) -> bool:
        """Wait for the submitted jobs until `until` or the last deadline, whichever is first; whether all are done."""
        ends = [t for t in (until, self.end) if t is not None]
        timeout = max(0.0, min(ends) - time.monotonic()) if ends else None
        return not wait([future for _, future, _ in self._pending], timeout=timeout).not_done

    def collect(self) -> bool:
        """Count every submitted job as it stands: its slices stored, or why it is missing. False when one is still
        running (it keeps its lane; this batch goes on without it)."""
        finished = True
        for job, future, behind in self._pending:
            group, rows, _ = job
            if not future.done():
                mark(self._missing, group.indices, rows, BUSY if future.cancel() and behind else DEADLINE)
                finished = False
                continue
            outcome = future.result()
            if outcome.error is not None or outcome.value is None:
                mark(self._missing, group.indices, rows, error_reason(outcome.error or RuntimeError("no result")))
                continue
            for part, result in outcome.value:
                if isinstance(result, Exception):
                    mark(self._missing, group.indices, part[1], error_reason(result))
                    continue
                everyone = range(len(self._due)) if part[1] is None else part[1].tolist()
                late = [row for row in everyone if (when := self._due[row]) is not None and outcome.finished > when]
                late_rows = torch.tensor(late, dtype=torch.long) if late else None
                self._store(part, result, late_rows)
                if late_rows is not None:
                    mark(self._missing, group.indices, late_rows, DEADLINE)
        self._pending = []
        return finished
