"""Settling members' plans together: the per-member choices against each uniform plan, timed as a batch is served.

Stand-in plans sleep (and, sharing a lock, queue like two engines fighting over the same cores), so the
expected choice is written here by hand from their sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from handlers.config.specs import TensorSpec
from handlers.execution.groups import Group
from handlers.execution.plans import Choice, fastest
from handlers.execution.schedule import PER_MEMBER, WITHIN, settle

SPEC = TensorSpec(shape=(3,))


def sleeper(seconds: float, lock: threading.Lock | None = None) -> Any:
    """A plan whose call takes `seconds`; with a `lock`, one call at a time among all plans that share it."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with lock or contextlib.nullcontext():
            time.sleep(seconds)
        return batch

    return forward


def chosen(group: Group) -> Choice:
    """The plan a group serves on: every group these tests settle has a choice (auto's, or the yaml's)."""
    assert group.choice is not None
    return group.choice


def member(index: int, plan: str, forwards: dict[str, Any], ms: dict[str, float]) -> Group:
    """A member `auto` put on `plan`, with every candidate's forward and its own ms per call at one size."""
    choice = Choice(plan, forwards[plan], ms={name: {1: value} for name, value in ms.items()}, candidates=forwards)
    return Group(
        spec=SPEC, indices=(index,), run=lambda batch: forwards[plan](batch).unsqueeze(0), fused=False, choice=choice
    )


class Served:
    """Serves a batch as the worker does: every group's call on two threads at once; counts the batches."""

    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, groups: Sequence[Group], images: int) -> None:
        self.batches += 1
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda group: group.run(torch.zeros(images, 3)), groups))


def test_a_uniform_plan_that_serves_faster_than_the_per_member_choices_is_kept() -> None:
    """Each member alone is fastest on its own plan (20 ms against 24), but those two plans share the cores and
    queue (40 ms a batch); both members on `eager` run side by side (24 ms), so `eager` is kept for both."""
    cores = threading.Lock()
    first = member(
        0, "frozen", {"frozen": sleeper(0.02, cores), "eager": sleeper(0.024)}, {"frozen": 20.0, "eager": 24.0}
    )
    second = member(
        1,
        "channels_last",
        {"channels_last": sleeper(0.02, cores), "eager": sleeper(0.024)},
        {"channels_last": 20.0, "eager": 24.0},
    )
    groups, schedule = settle([first, second], Served(), [1, 4])
    assert [chosen(group).plan for group in groups] == ["eager", "eager"]
    assert [dict(chosen(group).candidates) for group in groups] == [{}, {}]
    assert schedule is not None
    described = schedule.describe()
    assert described["kept"] == "all eager"
    assert described["members_own_timings_vs_per_member"] == {"all eager": 1.2}
    assert set(described["ms_per_batch"]) == {PER_MEMBER, "all eager"}
    assert all(set(sizes) == {"1", "4"} for sizes in described["ms_per_batch"].values())
    assert min(described["ms_per_batch"][PER_MEMBER].values()) >= 40
    assert max(described["ms_per_batch"]["all eager"].values()) < 40


def test_per_member_choices_that_serve_faster_are_kept() -> None:
    first = member(0, "frozen", {"frozen": sleeper(0.01), "eager": sleeper(0.012)}, {"frozen": 10.0, "eager": 12.0})
    second = member(1, "frozen", {"frozen": sleeper(0.01), "eager": sleeper(0.012)}, {"frozen": 10.0, "eager": 12.0})
    groups, schedule = settle([first, second], Served(), [2])
    assert [chosen(group).plan for group in groups] == ["frozen", "frozen"]
    assert schedule is not None and schedule.kept == PER_MEMBER
    assert set(schedule.ms) == {PER_MEMBER, "all eager"}


@pytest.mark.parametrize(
    ("eager_s", "expected"),
    [
        pytest.param(0.026, ["frozen", "channels_last"], id="mix-30%-faster-kept"),
        pytest.param(0.020, ["eager", "eager"], id="mix-no-faster-one-plan-served"),
    ],
)
def test_a_mix_of_plans_is_kept_only_when_clearly_faster_than_one_plan_for_all(
    eager_s: float, expected: list[str]
) -> None:
    """Two members on two plans, side by side (20 ms a batch), against both on eager: the mix must win by MIX_GAIN."""
    first = member(0, "frozen", {"frozen": sleeper(0.02), "eager": sleeper(eager_s)}, {"frozen": 20.0, "eager": 24.0})
    second = member(
        1,
        "channels_last",
        {"channels_last": sleeper(0.02), "eager": sleeper(eager_s)},
        {"channels_last": 20.0, "eager": 24.0},
    )
    groups, schedule = settle([first, second], Served(), [1])
    assert [chosen(group).plan for group in groups] == expected
    assert schedule is not None and schedule.kept == (PER_MEMBER if expected[0] == "frozen" else "all eager")


def test_a_uniform_plan_the_members_own_timings_rule_out_is_not_timed() -> None:
    slow = 10.0 * (WITHIN + 0.25)
    first = member(0, "frozen", {"frozen": sleeper(0.001), "eager": sleeper(0.001)}, {"frozen": 10.0, "eager": slow})
    second = member(1, "frozen", {"frozen": sleeper(0.001), "eager": sleeper(0.001)}, {"frozen": 10.0, "eager": slow})
    served = Served()
    groups, schedule = settle([first, second], served, [1])
    assert served.batches == 0
    assert [chosen(group).plan for group in groups] == ["frozen", "frozen"]
    assert schedule is not None
    assert (schedule.kept, schedule.ms) == (PER_MEMBER, {})
    assert schedule.estimated == {"all eager": WITHIN + 0.25, "all frozen": 1.0}  # The per-member choice itself.


def fixed(index: int) -> Group:
    """A member on a plan given in the yaml: `auto` built no candidates for it."""
    forward = sleeper(0.001)
    return Group(spec=SPEC, indices=(index,), run=forward, fused=False, choice=Choice("frozen", forward))


@pytest.mark.parametrize(
    "groups",
    [
        pytest.param(
            lambda: [
                member(0, "frozen", {"frozen": sleeper(0.001), "eager": sleeper(0.002)}, {"frozen": 1.0, "eager": 1.1})
            ],
            id="one-member",
        ),
        pytest.param(lambda: [fixed(0), fixed(1)], id="fixed-plans"),
    ],
)
def test_nothing_to_settle_times_nothing(groups: Any) -> None:
    given = groups()
    served = Served()
    settled, schedule = settle(given, served, [1, 8])
    assert (schedule, served.batches) == (None, 0)
    assert [chosen(group).plan for group in settled] == [chosen(group).plan for group in given]
    assert all(not chosen(group).candidates for group in settled)


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        pytest.param({"eager": 1.0, "frozen": 0.8, "onnxruntime": 0.5}, "onnxruntime", id="cheapest"),
        pytest.param(
            {"eager": 1.0, "onnxruntime": 0.5, "openvino": 0.48}, "onnxruntime", id="openvino-4%-cheaper-not-enough"
        ),
        pytest.param({"eager": 1.0, "onnxruntime": 0.5, "openvino": 0.45}, "openvino", id="openvino-10%-cheaper"),
        pytest.param({"openvino_bf16": 0.3}, "openvino_bf16", id="nothing-else-runs"),
        pytest.param({"onnxruntime_int8": 0.3, "openvino_int8": 0.2}, "openvino_int8", id="int8-a-third-cheaper"),
    ],
)
def test_a_plan_that_hands_calls_to_its_own_threads_must_be_clearly_cheaper(
    costs: dict[str, float], expected: str
) -> None:
    assert fastest(costs) == expected


def test_the_served_schedule_prefers_the_calling_thread_plan_over_a_near_tie_on_openvino() -> None:
    """Both members on ONNX Runtime (104 ms a batch) against both on OpenVINO (100 ms): 4% is enough to replace one
    plan by another (MIN_GAIN, 3%), not to hand the calls to OpenVINO's threads (5%): ONNX Runtime stays."""
    forwards = {"onnxruntime": sleeper(0.104), "openvino": sleeper(0.100)}
    first = member(0, "onnxruntime", dict(forwards), {"onnxruntime": 104.0, "openvino": 100.0})
    second = member(1, "onnxruntime", dict(forwards), {"onnxruntime": 104.0, "openvino": 100.0})
    groups, schedule = settle([first, second], Served(), [1])
    assert [chosen(group).plan for group in groups] == ["onnxruntime", "onnxruntime"]
    assert schedule is not None and schedule.kept == PER_MEMBER and set(schedule.ms) == {PER_MEMBER, "all openvino"}
