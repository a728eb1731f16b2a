"""Members' plans settled together, timed as a served batch runs them: every member's slices on the member threads.

`plans.choose` times one member's candidates with that member on every member thread. Served, a batch
runs all members' slices on the threads at once, so a member's plan shares the cores with the other
members' plans: other engines' thread pools, caches and memory traffic. Before a worker keeps the
per-member choices, it times them as whole served batches against each plan that every member could
run (the ensemble a user who picked one plan by hand would serve). Per-member choices that all name one plan are
replaced only by a uniform plan `MIN_GAIN` faster (the margin a plan needs to replace eager); choices that mix
plans are kept only when `MIX_GAIN` faster than the fastest uniform plan, which is served otherwise. A uniform
plan whose members' own timings put it over `WITHIN` times the per-member choices' is not timed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from handlers.execution.groups import Group
from handlers.execution.plan_timing import best_of_rounds
from handlers.execution.plans import AUTO_PLANS, MIN_GAIN, Choice, fastest

PER_MEMBER = "per member"
# A mix of plans must serve this much faster than the fastest uniform plan: a difference the worker's timing cannot
# carry over to serving. On the torchvision trio (resnet18 on OpenVINO, two members on ONNX Runtime) the worker timed
# the mix 2.8% ahead of all-ONNX Runtime; TorchServe served it at 0.94x (95% interval 0.88-0.98, in a run whose
# round order also cost it up to 4%). Within that margin auto serves what a user would pick by hand: one plan.
MIX_GAIN = 1.05
WITHIN = 1.25
ROUNDS = 5
TIME_BUDGET_S = 1.5
RunBatch = Callable[[Sequence[Group], int], None]


@dataclass(frozen=True)
class Schedule:
    """What settling measured: ms per served batch of each combination of plans, at each number of images."""

    kept: str
    ms: dict[str, dict[int, float]]
    estimated: dict[str, float]

    def describe(self) -> dict[str, Any]:
        """What `describe` shows as `execution_schedule`."""
        return {
            "kept": self.kept,
            "members_own_timings_vs_per_member": self.estimated,
            "ms_per_batch": {
                name: {str(images): round(ms, 3) for images, ms in sizes.items()} for name, sizes in self.ms.items()
            },
            "timed_as": "every member's slices of a batch of that many images on the member threads, as served; "
            "best round",
        }


def settle(groups: Sequence[Group], run: RunBatch, images: Sequence[int]) -> tuple[list[Group], Schedule | None]:
    """The groups on the fastest combination of plans for batches of `images`, and what was measured (None when there
    is nothing to choose: one group, or no member whose plan `auto` chose here).

    `run(groups, n)` serves one batch of `n` images through `groups` as the worker would.
    """
    open_ = {i: group.choice for i, group in enumerate(groups) if group.choice is not None and group.choice.candidates}
    if not open_ or len(groups) < 2:
        return [group.settled() for group in groups], None
    own = _estimate(list(open_.values()), None)
    combinations, estimated = {PER_MEMBER: list(groups)}, {}
    for plan in AUTO_PLANS:
        if not all(plan in choice.candidates for choice in open_.values()):
            continue
        estimated[f"all {plan}"] = round(_estimate(list(open_.values()), plan) / own, 3)
        if estimated[f"all {plan}"] <= WITHIN and not all(choice.plan == plan for choice in open_.values()):
            combinations[f"all {plan}"] = [
                group.on_plan(plan) if i in open_ else group for i, group in enumerate(groups)
            ]
    ms = _time(combinations, run, images) if len(combinations) > 1 else {}
    chosen = {choice.plan for choice in open_.values()}
    kept = _kept(ms, chosen.pop() if len(chosen) == 1 else None) if ms else PER_MEMBER
    return [group.settled() for group in combinations[kept]], Schedule(kept, ms, estimated)


def _kept(ms: dict[str, dict[int, float]], own: str | None) -> str:
    """The combination to serve, of those timed. `own` is the plan every per-member choice names (None: they mix
    plans). One plan for all is kept only when `MIN_GAIN` faster than it (plans compared by `plans.fastest`); a mix
    only when `MIX_GAIN` faster than the fastest uniform plan, which is served otherwise."""
    per_member = _geometric_mean(ms[PER_MEMBER].values())
    uniform = {name.removeprefix("all "): _geometric_mean(ms[name].values()) for name in ms if name != PER_MEMBER}
    if own is None:
        plan = fastest(uniform)
        return PER_MEMBER if uniform[plan] >= MIX_GAIN * per_member else f"all {plan}"
    plan = fastest({**uniform, own: per_member})
    return f"all {plan}" if plan != own and per_member >= MIN_GAIN * uniform[plan] else PER_MEMBER


def _estimate(choices: Sequence[Choice], plan: str | None) -> float:
    """The members' own ms per call on `plan` (None: each on its chosen plan), summed over members and timed sizes."""
    return sum(sum(choice.ms[plan or choice.plan].values()) for choice in choices)


def _time(combinations: dict[str, list[Group]], run: RunBatch, images: Sequence[int]) -> dict[str, dict[int, float]]:
    """Best-of-rounds ms per batch for each combination at each size (`plan_timing.best_of_rounds`), after one
    untimed batch each that warms caches and engines' pools."""
    for count in images:
        for groups in combinations.values():
            run(groups, count)

    def timed(name: str, count: int) -> float:
        began = time.perf_counter()
        run(combinations[name], count)
        return time.perf_counter() - began

    return best_of_rounds(list(combinations), images, timed, rounds=ROUNDS, budget_s=TIME_BUDGET_S)


def _geometric_mean(values: Any) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))
