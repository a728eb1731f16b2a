"""Early exit's stages: the member groups cheapest first, and how long a stage may take under a deadline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from handlers.execution.groups import Group

# Under a deadline an early-exit stage that takes HEDGE_FACTOR times its measured cost (at least HEDGE_FLOOR_S) is a
# straggler: the later stages start beside it rather than after it.
HEDGE_FACTOR, HEDGE_FLOOR_S = 4.0, 0.02


class Staging:
    """The groups in early exit's order, with their ms per call for one input: cheapest first, ties as declared.

    A member's cost is its plan's own timing for one input where `auto` measured it; other groups are timed here,
    once, when this is made.
    """

    def __init__(self, groups: Sequence[Group], device: torch.device, names: Sequence[str]) -> None:
        costed = [(group, _cost(group, device)) for group in groups]
        self._costed = sorted(costed, key=lambda pair: (pair[1], pair[0].indices[0]))
        self._names = list(names)

    @property
    def groups(self) -> list[Group]:
        return [group for group, _ in self._costed]

    def describe(self) -> list[dict[str, Any]]:
        """The stages as describe shows them: their members and ms per call for one input."""
        return [
            {"members": [self._names[i] for i in group.indices], "ms_per_input": round(cost, 3)}
            for group, cost in self._costed
        ]

    def hedge(self, group: Group, inputs: int) -> float:
        """Seconds `group`'s stage may take on `inputs` under a deadline before the later stages start beside it."""
        cost_ms = next(cost for staged, cost in self._costed if staged is group)
        return max(HEDGE_FLOOR_S, HEDGE_FACTOR * cost_ms * inputs / 1000)


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
