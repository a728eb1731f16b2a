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
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from handlers.config.specs import EnsembleSpec, InputSpec, MemberInput
from handlers.execution.group_calls import GroupCalls
from handlers.execution.groups import Group, PlanContext, plan_groups
from handlers.execution.lanes import Job, Lanes
from handlers.execution.outputs import fit_head
from handlers.execution.plan_forwards import Exported
from handlers.execution.schedule import settle
from handlers.execution.staging import Staging
from handlers.execution.tally import Tally
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
        self._calls = GroupCalls(spec, device, MemberThreads(parallelism))
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
            self._calls.run(jobs, Tally(self.spec, images, self._scored, None), capture=False)

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

        attempt = functools.partial(self._calls.attempt, requests=requests)
        calls = None if due is None else self._lanes.calls(attempt, tally.store, missing, due)

        def execute(jobs: list[Job]) -> None:
            if calls is None:
                self._calls.run(self._lanes.wait_for(jobs, missing), tally, requests=requests)
                return
            calls.submit(jobs)
            calls.wait(None)
            calls.collect()

        with torch.inference_mode():
            if settle is not None:
                stages = self.stages
                for position, group in enumerate(stages):
                    rows = _rows_needing(group.indices, wanted, count)
                    if rows is not None and not len(rows):
                        continue
                    job = (group, rows, self._batch(inputs, group, rows))
                    if calls is None:
                        execute([job])
                    else:
                        calls.submit([job])
                        inputs_needing = count if rows is None else len(rows)
                        if not calls.wait(time.monotonic() + self.staging.hedge(group, inputs_needing)):
                            # A straggler: the later stages start now, side by side, on the inputs still needing them.
                            later = [
                                (g, r, self._batch(inputs, g, r))
                                for g, r in _needing(stages[position + 1 :], wanted, count)
                            ]
                            calls.submit(later)
                            calls.wait(None)
                            calls.collect()
                            break
                        calls.collect()
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
    def staging(self) -> Staging:
        """Early exit's order of the groups (`execution.staging`), costed when the first request that stops early
        arrives."""
        return Staging(self.groups, self.device, [member.name for member in self.spec.members])

    @property
    def stages(self) -> list[Group]:
        """The groups in early exit's order: cheapest first."""
        return self.staging.groups

    def stage_order(self) -> list[dict[str, Any]]:
        """The stages as describe shows them: their members and ms per call for one input."""
        return self.staging.describe()

    def _batch(self, inputs: Inputs, group: Group, rows: torch.Tensor | None) -> torch.Tensor:
        """The rows of `inputs` (all for None) transformed for `group`'s input spec, on the device."""
        if isinstance(inputs, torch.Tensor):
            return self._to_device(inputs if rows is None else inputs[rows])
        picked = inputs if rows is None else [inputs[i] for i in rows.tolist()]
        spec = _image_spec(group.spec)
        return self._to_device(batch_tensors(picked, [spec])[spec])

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


def _needing(
    groups: Sequence[Group], wanted: Sequence[Collection[int]] | None, count: int
) -> list[tuple[Group, torch.Tensor | None]]:
    """The groups some input still needs, with those inputs (None: all)."""
    needing = [(group, _rows_needing(group.indices, wanted, count)) for group in groups]
    return [(group, rows) for group, rows in needing if rows is None or len(rows)]


def _image_spec(spec: MemberInput) -> InputSpec:
    """A member's input where the request carries images: every member of an image ensemble takes images."""
    assert isinstance(spec, InputSpec), "images go to the members of an image ensemble only"
    return spec
