"""How a member group's work in a batch runs: in slices on the member threads, or slice after slice on one thread
(a lane's). A group that raises on a batch is tried again on each request's inputs alone, so that one request's input
costs only that request the member.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from handlers.config.specs import EnsembleSpec
from handlers.execution.groups import Group
from handlers.execution.lanes import Job, Slice
from handlers.execution.missing import error_reason, mark
from handlers.execution.tally import Tally
from handlers.execution.threads import MemberThreads


class GroupCalls:
    """Runs member groups' jobs on one device and the member threads."""

    def __init__(self, spec: EnsembleSpec, device: torch.device, threads: MemberThreads) -> None:
        self.spec = spec
        self.device = device
        self.threads = threads

    def run(
        self, jobs: Sequence[Job], tally: Tally, *, capture: bool = True, requests: Sequence[tuple[int, int]] = ()
    ) -> None:
        """Each (group, rows, batch of those rows) in slices on the member threads; scores go to the `tally` at the
        rows. A group that raised is tried again per request, and is missing from the rows it still fails
        on (with `capture`; else the exception is raised here)."""
        tasks, calls = [], []
        for group, _, batch in jobs:
            chunks = (
                torch.split(batch, self.spec.rows_per_call(len(batch), self.threads.parallelism)) if len(batch) else ()
            )
            calls.append(len(chunks))
            tasks += [(group, chunk) for chunk in chunks]
        results = iter(self.threads.map(self._run, tasks, capture=capture))
        for job, count in zip(jobs, calls, strict=True):
            if not count:
                continue
            done = [next(results) for _ in range(count)]
            failure = next((result for result in done if isinstance(result, Exception)), None)
            if failure is None:
                tally.store(job, done)
                continue
            parts = _per_request(job, requests)
            attempts = [self.attempt(part)[0] for part in parts] if len(parts) > 1 else [(job, failure)]
            for part, result in attempts:
                if isinstance(result, Exception):
                    mark(tally.missing, part[0].indices, part[1], error_reason(result))
                else:
                    tally.store(part, result)

    def attempt(self, job: Job, requests: Sequence[tuple[int, int]] = ()) -> list[tuple[Job, list[Slice] | Exception]]:
        """A group's job on this thread, slice after slice: its slices, or the exception it raised; when it raised and
        the job holds several `requests`' inputs, each request's part again on its own."""
        group, _, batch = job
        try:
            chunks = torch.split(batch, self.spec.rows_per_call(len(batch), 1)) if len(batch) else ()
            return [(job, [self._run((group, chunk)) for chunk in chunks])]
        except Exception as e:  # The member's failure is this job's outcome.
            parts = _per_request(job, requests)
            return [self.attempt(part)[0] for part in parts] if len(parts) > 1 else [(job, e)]

    def _run(self, task: tuple[Group, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """One group on one slice, and its seconds; inference mode is per thread, so each task enters it itself."""
        group, chunk = task
        began = time.perf_counter()
        with torch.inference_mode():
            probs = group.run(chunk)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return probs, time.perf_counter() - began


def _per_request(job: Job, requests: Sequence[tuple[int, int]]) -> list[Job]:
    """A job cut into one job per request ([start, end) input ranges) whose inputs it holds."""
    group, rows, batch = job
    views = group.spec.views
    inputs = list(range(len(batch) // views)) if rows is None else rows.tolist()
    parts: list[Job] = []
    for start, end in requests:
        positions = [p for p, i in enumerate(inputs) if start <= i < end]
        if positions:
            take = torch.tensor([p * views + v for p in positions for v in range(views)])
            parts.append((group, torch.tensor([inputs[p] for p in positions]), batch[take.to(batch.device)]))
    return parts
