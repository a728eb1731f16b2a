"""Running members: every member group a batch needs, in slices, side by side on the member threads.

All inputs of a batch are turned into one tensor per distinct input spec (an image's test-time views
are rows of it), run through every member group in slices (on the CPU, side by side on the member
threads), and averaged over each image's views. Under `consistency: batch_invariant` every slice is
one row, so an image's scores never depend on what shares its batch.

A member that raises or gives non-finite scores is missing from the inputs it failed on, with the reason; the
others answer. A batch with a deadline runs each group on its own lane (`execution.lanes`) and waits for them
only until then: a member still running is missing (`deadline`), one still running an earlier batch's call `busy`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from handlers.config.specs import EnsembleSpec, InputSpec, MemberInput
from handlers.execution.groups import Group, PlanContext, plan_groups
from handlers.execution.lanes import Job, Lanes, Slice
from handlers.execution.missing import DEADLINE, NON_FINITE, error_reason, mark
from handlers.execution.outputs import fit_head
from handlers.execution.plan_forwards import Exported
from handlers.execution.schedule import settle
from handlers.execution.threads import MemberThreads
from handlers.inputs.images import batch_tensors

T = TypeVar("T")
R = TypeVar("R")
Inputs = Sequence[Image.Image] | torch.Tensor


@dataclass(frozen=True)
class Scores:
    """`probs[member, input, label]` as float64 on the CPU, NaN where a member did not run or is missing; and per
    input, the members missing from it (positions) and why."""

    probs: torch.Tensor
    missing: list[dict[int, str]]


class MemberRunner:
    """The members of one ensemble on one device, grouped and planned, and the threads that run them."""

    def __init__(
        self,
        spec: EnsembleSpec,
        modules: Sequence[nn.Module],
        device: torch.device,
        *,
        parallelism: int = 1,
        remembered_plans: Mapping[str, Mapping[str, Any]] | None = None,
        exported: Mapping[str, Exported] | None = None,
    ) -> None:
        """`parallelism` > 1 runs (member group, slice) tasks on that many threads at once (the caller's included).

        PyTorch releases the GIL inside its kernels, so with one intra-op thread per task the members
        of one batch spread over the cores: a single image's members run side by side, and a large
        batch is cut into one slice per thread. `remembered_plans` are plan choices another worker
        made (see `execution.plan_store`); `exported` is what the archive holds for each member's ONNX plan.
        """
        self.spec = spec
        self.device = device
        self.parallelism = parallelism
        self._threads = MemberThreads(parallelism)
        self._lanes = Lanes(spec)
        # Which labels each member scores: a multilabel member's other labels are NaN by design, not a failure.
        self._scored = torch.tensor(
            [[label in (member.labels or spec.labels) for label in spec.labels] for member in spec.members]
        )
        member_inputs = [spec.member_input(member) for member in spec.members]
        plans = PlanContext(
            executions=[spec.member_execution(member) for member in spec.members],
            sizes=[spec.slice_sizes(parallelism, given.views) for given in member_inputs],
            exported=[(exported or {}).get(member.name) for member in spec.members],
            remembered=remembered_plans or {},
            concurrency=parallelism,
        )
        heads = [
            fit_head(member, module, given.instance_shape, spec.task, spec.labels, device).to(device)
            for member, module, given in zip(spec.members, modules, member_inputs, strict=True)
        ]
        groups = plan_groups(
            spec.members, heads, member_inputs, fuse=spec.batching.fuse_members, device=device, plans=plans
        )
        probes: dict[tuple[MemberInput, int], torch.Tensor] = {}
        self.groups: list[Group]
        self.groups, self.schedule = settle(
            groups,
            lambda chosen, images: self._serve_probe(chosen, images, probes),
            sorted({1, spec.batching.batch_size}),
        )

    def plan_choices(self) -> dict[str, dict[str, Any]]:
        """Each planned member's execution choice, as `describe` shows it (fused members run eager under vmap)."""
        names = [member.name for member in self.spec.members]
        return {names[group.indices[0]]: group.choice.describe() for group in self.groups if group.choice is not None}

    def _serve_probe(
        self, groups: Sequence[Group], images: int, probes: dict[tuple[MemberInput, int], torch.Tensor]
    ) -> None:
        """One batch of `images` random inputs through `groups`, as `probabilities` serves a batch (no early exit);
        the inputs are made once per input spec and size, in `probes`."""
        jobs = []
        for group in groups:
            key = (group.spec, images)
            if key not in probes:
                generator = torch.Generator().manual_seed(images)
                probe = torch.randn(images * group.spec.views, *group.spec.instance_shape, generator=generator)
                probes[key] = self._to_device(probe)
            jobs.append((group, None, probes[key]))
        with torch.inference_mode():
            self._run_groups(jobs, Tally(self.spec, images, self._scored, None), capture=False)

    def describe(self) -> list[dict[str, Any]]:
        """Each group's members, plan and fusion, in run order."""
        names = [member.name for member in self.spec.members]
        return [group.describe(names) for group in self.groups]

    def probabilities(
        self,
        inputs: Inputs,
        forward_seconds: dict[str, float] | None = None,
        wanted: Sequence[Collection[int]] | None = None,
        settle: Callable[[torch.Tensor], Sequence[Collection[int]]] | None = None,
    ) -> torch.Tensor:
        """probs[member, input, label] (`run` says how), for callers that serve no deadline: a member that failed
        raises here."""
        scores = self.run(inputs, forward_seconds, wanted, settle)
        for missing in scores.missing:
            for member, reason in missing.items():
                raise RuntimeError(f"member {self.spec.members[member].name}: {reason}")
        return scores.probs

    def run(
        self,
        inputs: Inputs,
        forward_seconds: dict[str, float] | None = None,
        wanted: Sequence[Collection[int]] | None = None,
        settle: Callable[[torch.Tensor], Sequence[Collection[int]]] | None = None,
        deadlines: Sequence[float | None] | None = None,
        requests: Sequence[tuple[int, int]] = (),
    ) -> Scores:
        """Every needed member's probabilities on `inputs`; each image is transformed once per input spec.

        `inputs` are decoded images, or for a tensor-input ensemble one tensor [N, *shape]. A member
        with test-time augmentation scores an image by the mean of its probabilities over the views.
        `wanted[i]`, when given, holds the positions of the members input i needs: a member runs only
        on the inputs that need it (fused members run when any of them is needed), and its scores
        for the others are NaN. Given `forward_seconds`, each member's time in its forward calls is
        added to it (fused members share their group's time equally; on CUDA each call is
        synchronized so the time is the kernels').

        With `settle`, the groups run one after another in `stages` order, and after each `settle(probs)`
        says what every input still needs: an input settled early is not even transformed for the later stages.

        `deadlines[i]` (`time.monotonic()` seconds, None for none) is when input i's answer is due: given any,
        the groups run on their lanes and a member that has not answered an input by its deadline is missing there.
        `requests` are the inputs' requests as [start, end) ranges: a member that raises on a batch is tried again on
        each request's inputs alone, so that one request's input costs only that request the member.
        """
        count = len(inputs)
        tally = Tally(self.spec, count, self._scored, forward_seconds)
        probs, missing = tally.probs, tally.missing
        timed = deadlines is not None and any(due is not None for due in deadlines)
        due = list(deadlines) if timed and deadlines is not None else None

        def execute(jobs: list[Job]) -> bool:
            if due is not None:
                attempt = functools.partial(self._attempt, requests=requests)
                return self._lanes.run(jobs, attempt, tally.store, missing, due)
            self._run_groups(self._lanes.wait_for(jobs, missing), tally, requests=requests)
            return True

        with torch.inference_mode():
            if settle is not None:
                stages = self.stages
                for position, group in enumerate(stages):
                    rows = _rows_needing(group.indices, wanted, count)
                    if rows is None or len(rows):
                        if not execute([(group, rows, self._batch(inputs, group, rows))]):
                            for later in stages[position + 1 :]:
                                mark(missing, later.indices, _rows_needing(later.indices, wanted, count), DEADLINE)
                            break
                        if position < len(stages) - 1:
                            wanted = settle(probs)
                return Scores(probs, missing)
            on_device: dict[MemberInput, torch.Tensor]
            if isinstance(inputs, torch.Tensor):
                on_device = {self.spec.input: self._to_device(inputs)}
            else:
                batches = batch_tensors(inputs, [_image_spec(group.spec) for group in self.groups])
                on_device = {spec: self._to_device(batch) for spec, batch in batches.items()}
            jobs = []
            for group in self.groups:
                rows = _rows_needing(group.indices, wanted, count)
                batch = on_device[group.spec]
                if rows is not None:
                    batch = torch.unflatten(batch, 0, (count, group.spec.views))[rows.to(batch.device)].flatten(0, 1)
                jobs.append((group, rows, batch))
            execute(jobs)
            return Scores(probs, missing)

    def stuck(self) -> list[str]:
        """The members whose lane call has run longer than the ensemble's `stuck_after_s`."""
        return self._lanes.stuck()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no member call that overran a deadline is still running, for at most `timeout` seconds."""
        return self._lanes.wait_idle(timeout)

    @functools.cached_property
    def _staging(self) -> list[tuple[Group, float]]:
        """The groups in early exit's order, with their ms per call for one input: cheapest first, ties as declared.

        A member's cost is its plan's own timing for one input where `auto` measured it; other groups are
        timed here, once, when the first request that stops early arrives.
        """
        costed = [(group, _cost(group, self.device)) for group in self.groups]
        return sorted(costed, key=lambda pair: (pair[1], pair[0].indices[0]))

    @property
    def stages(self) -> list[Group]:
        """The groups in early exit's order (`_staging`)."""
        return [group for group, _ in self._staging]

    def stage_order(self) -> list[dict[str, Any]]:
        """The stages as describe shows them: their members and ms per call for one input."""
        names = [member.name for member in self.spec.members]
        return [
            {"members": [names[i] for i in group.indices], "ms_per_input": round(cost, 3)}
            for group, cost in self._staging
        ]

    def _batch(self, inputs: Inputs, group: Group, rows: torch.Tensor | None) -> torch.Tensor:
        """The rows of `inputs` (all for None) transformed for `group`'s input spec, on the device."""
        if isinstance(inputs, torch.Tensor):
            return self._to_device(inputs if rows is None else inputs[rows])
        picked = inputs if rows is None else [inputs[i] for i in rows.tolist()]
        spec = _image_spec(group.spec)
        return self._to_device(batch_tensors(picked, [spec])[spec])

    def _run_groups(
        self, jobs: Sequence[Job], tally: Tally, *, capture: bool = True, requests: Sequence[tuple[int, int]] = ()
    ) -> None:
        """Each (group, rows, batch of those rows) in slices on the member threads; scores go to the `tally` at the
        rows. A group that raised is tried again per request (`run`), and is missing from the rows it still fails
        on (with `capture`; else the exception is raised here)."""
        tasks, calls = [], []
        for group, _, batch in jobs:
            chunks = torch.split(batch, self.spec.rows_per_call(len(batch), self.parallelism)) if len(batch) else ()
            calls.append(len(chunks))
            tasks += [(group, chunk) for chunk in chunks]
        results = iter(self._threads.map(self._run, tasks, capture=capture))
        for job, count in zip(jobs, calls, strict=True):
            if not count:
                continue
            done = [next(results) for _ in range(count)]
            failure = next((result for result in done if isinstance(result, Exception)), None)
            if failure is None:
                tally.store(job, done)
                continue
            parts = _per_request(job, requests)
            attempts = [self._attempt(part)[0] for part in parts] if len(parts) > 1 else [(job, failure)]
            for part, result in attempts:
                if isinstance(result, Exception):
                    mark(tally.missing, part[0].indices, part[1], error_reason(result))
                else:
                    tally.store(part, result)

    def _attempt(self, job: Job, requests: Sequence[tuple[int, int]] = ()) -> list[tuple[Job, list[Slice] | Exception]]:
        """A group's job on this thread, slice after slice: its slices, or the exception it raised; when it raised and
        the job holds several `requests`' inputs, each request's part again on its own."""
        group, _, batch = job
        try:
            chunks = torch.split(batch, self.spec.rows_per_call(len(batch), 1)) if len(batch) else ()
            return [(job, [self._run((group, chunk)) for chunk in chunks])]
        except Exception as e:  # The member's failure is this job's outcome.
            parts = _per_request(job, requests)
            return [self._attempt(part)[0] for part in parts] if len(parts) > 1 else [(job, e)]

    def _run(self, task: tuple[Group, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """One group on one slice, and its seconds; inference mode is per thread, so each task enters it itself."""
        group, chunk = task
        began = time.perf_counter()
        with torch.inference_mode():
            probs = group.run(chunk)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return probs, time.perf_counter() - began

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch


def _rows_needing(group: Sequence[int], wanted: Sequence[Collection[int]] | None, count: int) -> torch.Tensor | None:
    """The inputs (positions) that need any member of `group`, or None when all of them do."""
    if wanted is None:
        return None
    rows = [i for i, members in enumerate(wanted) if not set(group).isdisjoint(members)]
    return None if len(rows) == count else torch.tensor(rows, dtype=torch.long)


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


def _image_spec(spec: MemberInput) -> InputSpec:
    """A member's input where the request carries images: every member of an image ensemble takes images."""
    assert isinstance(spec, InputSpec), "images go to the members of an image ensemble only"
    return spec


class Tally:
    """One batch's scores as they come in: `probs[member, input, label]` (NaN until a member answers an input), and
    per input the members missing from it and why; each member's forward seconds are added to `forward_seconds`."""

    def __init__(
        self, spec: EnsembleSpec, count: int, scored: torch.Tensor, forward_seconds: dict[str, float] | None
    ) -> None:
        """`scored[member, label]`: the labels each member scores (a multilabel member's others are NaN by design)."""
        self.names = [member.name for member in spec.members]
        self.probs = torch.full((len(spec.members), count, len(spec.labels)), math.nan, dtype=torch.float64)
        self.missing: list[dict[int, str]] = [{} for _ in range(count)]
        self._scored = scored
        self._forward_seconds = forward_seconds

    def store(self, job: Job, done: Sequence[tuple[torch.Tensor, float]], late: torch.Tensor | None = None) -> None:
        """A group's scores on its rows (averaged over views), except on the `late` inputs (past their deadline); a
        member's non-finite scores on an input make it missing there (`non_finite`) instead."""
        group, rows, _ = job
        scores = torch.cat([part for part, _ in done], dim=1).to("cpu", torch.float64)
        views = group.spec.views
        if views > 1:
            scores = torch.unflatten(scores, 1, (-1, views)).mean(dim=2)
        members = torch.tensor(group.indices)
        broken = ~(scores.isfinite() | ~self._scored[members][:, None, :]).all(dim=-1)
        if broken.any():
            scores[broken] = math.nan
            for m, row in broken.nonzero().tolist():
                self.missing[row if rows is None else int(rows[row])][group.indices[m]] = NON_FINITE
        if rows is None:
            self.probs[members] = scores
        else:
            self.probs[members[:, None], rows[None, :]] = scores
        if late is not None:
            self.probs[members[:, None], late[None, :]] = math.nan
        if self._forward_seconds is not None:
            seconds = sum(spent for _, spent in done) / len(group.indices)
            for member in group.indices:
                name = self.names[member]
                self._forward_seconds[name] = self._forward_seconds.get(name, 0.0) + seconds


def _cost(group: Group, device: torch.device) -> float:
    """ms per call on one input's rows: the plan's timing when it has one, else the median of five calls here."""
    size = group.spec.views
    timed = group.choice.ms.get(group.choice.plan, {}) if group.choice is not None else {}
    if size in timed:
        return timed[size]
    probe = torch.randn(size, *group.spec.instance_shape, generator=torch.Generator().manual_seed(0)).to(device)
    spent = []
    with torch.inference_mode():
        group.run(probe)
        for _ in range(5):
            began = time.perf_counter()
            group.run(probe)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent.append((time.perf_counter() - began) * 1000)
    return sorted(spent)[2]
