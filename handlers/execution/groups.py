"""How members run: one module per call on its execution plan, or members of one architecture and input spec fused.

Each member running alone runs on the plan `execution.plans` chose for it. Fusing stacks the
members' parameters (`torch.func.stack_module_state`) and runs one `vmap` of `functional_call` over them.
It is only used when it reproduces the one-at-a-time outputs within `FUSE_TOLERANCE` on a probe batch;
otherwise those members run one at a time.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from handlers.config.specs import Execution, MemberInput, MemberSpec
from handlers.errors import MemberLoadError
from handlers.execution.outputs import largest_difference
from handlers.execution.plan_forwards import Exported, PlanRejected
from handlers.execution.plans import Choice, choose

FUSE_TOLERANCE = 1e-5
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """Members (by position) that share one input spec and run in one call: [n, *input] -> [g, n, labels]."""

    spec: MemberInput
    indices: tuple[int, ...]
    run: Callable[[torch.Tensor], torch.Tensor]
    fused: bool
    choice: Choice | None = field(default=None, compare=False)

    def describe(self, names: Sequence[str]) -> dict[str, object]:
        """The group as `describe` lists it: its members, whether fused, and the plan it runs."""
        return {
            "members": [names[i] for i in self.indices],
            "fused": self.fused,
            "plan": self.choice.plan if self.choice else "eager",
        }

    def on_plan(self, plan: str) -> Group:
        """This member on another plan `auto` built, verified and timed for it (one of `choice.candidates`)."""
        if self.choice is None or plan not in self.choice.candidates:
            raise KeyError(f"plan {plan!r} was not built for members {self.indices}")
        choice = replace(self.choice, plan=plan, forward=self.choice.candidates[plan])
        return _single(self.indices[0], choice.forward, self.spec, choice)

    def settled(self) -> Group:
        """The group with its plan final: the candidates it no longer needs are let go (their memory, their engines)."""
        if self.choice is None or not self.choice.candidates:
            return self
        choice = replace(self.choice, candidates={})
        return _single(self.indices[0], choice.forward, self.spec, choice)


@dataclass(frozen=True)
class PlanContext:
    """What choosing a member's plan needs besides the member: its execution settings, the rows per call to time, and
    how many member threads call a member at once."""

    executions: Sequence[Execution]
    sizes: Sequence[Sequence[int]]
    exported: Sequence[Exported | None] = ()
    remembered: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    concurrency: int = 1


def plan_groups(
    members: Sequence[MemberSpec],
    modules: Sequence[nn.Module],
    specs: Sequence[MemberInput],
    *,
    fuse: bool,
    device: torch.device,
    plans: PlanContext | None = None,
) -> list[Group]:
    """One group per member, or with `fuse`, one per (architecture, kwargs, input spec) that passes the probe.

    With `plans`, every member that runs alone gets its plan chosen (fused groups run eager under vmap).
    """

    def single(i: int) -> Group:
        if plans is None:
            return _single(i, modules[i], specs[i])
        return _planned(i, members[i], modules[i], specs[i], plans, device)

    if not fuse:
        return [single(i) for i in range(len(modules))]
    by_kind: dict[tuple[Any, ...], list[int]] = {}
    for i, (member, spec) in enumerate(zip(members, specs, strict=True)):
        # A lossy precision runs on its own engine, never fused: the key gives such a member a group of its own.
        lossy = member.name if plans is not None and plans.executions[i].precision != "fp32" else None
        kind = (spec, member.arch, json.dumps(member.kwargs, sort_keys=True), member.output, member.labels, lossy)
        by_kind.setdefault(kind, []).append(i)
    groups = []
    for (spec, *_), indices in by_kind.items():
        if len(indices) == 1:
            groups.append(single(indices[0]))
            continue
        fused = _fused(indices, [modules[i] for i in indices], spec)
        if _matches_sequential(fused, [modules[i] for i in indices], spec, device):
            groups.append(fused)
        else:
            logger.warning("members %s do not fuse within %g; running them one at a time", indices, FUSE_TOLERANCE)
            groups.extend(single(i) for i in indices)
    return sorted(groups, key=lambda group: group.indices[0])


def _single(
    index: int, forward: Callable[[torch.Tensor], torch.Tensor], spec: MemberInput, choice: Choice | None = None
) -> Group:
    return Group(spec=spec, indices=(index,), run=lambda batch: forward(batch).unsqueeze(0), fused=False, choice=choice)


def _planned(
    index: int, member: MemberSpec, module: nn.Module, spec: MemberInput, plans: PlanContext, device: torch.device
) -> Group:
    try:
        choice = choose(
            module,
            spec.instance_shape,
            plans.executions[index],
            sizes=plans.sizes[index],
            device=device,
            remembered=plans.remembered.get(member.name),
            exported=plans.exported[index] if plans.exported else None,
            concurrency=plans.concurrency,
        )
    except PlanRejected as e:
        raise MemberLoadError(f"member {member.name!r}: {e}; choose another execution plan, or plan: auto") from e
    logger.info("member %s runs on plan %s (%s)", member.name, choice.plan, choice.describe())
    return _single(index, choice.forward, spec, choice)


def _fused(indices: list[int], modules: list[nn.Module], spec: MemberInput) -> Group:
    params, buffers = stack_module_state(modules)
    template = copy.deepcopy(modules[0]).to("meta")

    def one(weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        probs: torch.Tensor = functional_call(template, (weights, state), (batch,))
        return probs

    batched = torch.vmap(one, in_dims=(0, 0, None))
    return Group(spec=spec, indices=tuple(indices), run=lambda batch: batched(params, buffers, batch), fused=True)


def _matches_sequential(group: Group, modules: list[nn.Module], spec: MemberInput, device: torch.device) -> bool:
    probe = torch.randn(2, *spec.instance_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        sequential = torch.stack([module(probe) for module in modules])
        try:
            fused = group.run(probe)
        except Exception:  # vmap refuses some modules (data-dependent control flow, .item()): do not fuse them.
            logger.warning("vmap cannot run members %s", group.indices, exc_info=True)
            return False
    return largest_difference(fused, sequential) <= FUSE_TOLERANCE
